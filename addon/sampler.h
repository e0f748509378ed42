// Token sampling on the engine thread: the grammar bitmask, logit_bias, penalties, temperature, top-k, top-p, min-p,
// seeded RNG, and raw logprobs (log-softmax of the model's logits before any processing, as vLLM
// reports them).
// Thread safety: a Sampler and its sequence states belong to the engine thread.
#pragma once
#include <cstdint>
#include <random>
#include <unordered_map>
#include <vector>

namespace loraplex {

struct SamplingParams {
  float temperature = 0.f;  // 0 = greedy
  float top_p = 1.f;
  int top_k = -1;           // -1 = off
  float min_p = 0.f;
  float repetition_penalty = 1.f;
  float presence_penalty = 0.f;
  float frequency_penalty = 0.f;
  int num_logprobs = 0;     // top-N alternatives to report (0..20); -1: no logprobs at all
  bool suppress_eos = false;  // min_tokens not reached yet
  // logit_bias: n_bias (token, bias) pairs added to the logits first (the arrays belong to the
  // step's batch and outlive sample()).
  const int32_t* bias_ids = nullptr;
  const float* bias_values = nullptr;
  int n_bias = 0;
  // Grammar bitmask (structured outputs): ceil(vocab / 32) int32 words, bit t of word t >> 5 set
  // = token t allowed; nullptr = unconstrained. Applied first, before logit_bias, penalties,
  // temperature, top-k/top-p/min-p; reported logprobs are those of the masked logits (vLLM v1).
  const int32_t* mask = nullptr;
};

struct SeqSamplingState {
  std::mt19937_64 rng;
  std::vector<uint8_t> in_prompt;                  // [vocab] flag, only if repetition penalty is used
  std::unordered_map<int32_t, int32_t> out_counts; // generated token -> count
};

struct SampleResult {
  int32_t token;  // -1: the logits were not all finite; nothing was sampled or recorded
  float logprob;
  std::vector<int32_t> top_ids;   // [num_logprobs]
  std::vector<float> top_logprobs;
};

// Teacher-forced logprob of `target` under logits[vocab] (log-softmax, as the sampler's raw
// logprobs), its 1-based rank, and the n_top best (id, logprob) pairs, best first.
struct RowLogprobs {
  float logprob;
  int32_t rank;
  std::vector<int32_t> top_ids;
  std::vector<float> top_logprobs;
};
RowLogprobs row_logprobs(const float* logits, int V, int32_t target, int n_top);

class Sampler {
 public:
  Sampler(int vocab, std::vector<int32_t> eos_ids) : vocab_(vocab), eos_ids_(std::move(eos_ids)) {}
  // Registers a sequence once, before its first sampled token. seeded: the RNG starts from `seed`
  // (any 64-bit value; a request's int64 seed as its bits), else from the system's entropy.
  void add_sequence(uint32_t seq_id, bool seeded, uint64_t seed, const int32_t* prompt, int n_prompt);
  void remove_sequence(uint32_t seq_id) { states_.erase(seq_id); }
  bool has_sequence(uint32_t seq_id) const { return states_.count(seq_id) != 0; }
  size_t num_sequences() const { return states_.size(); }
  // Samples from logits[vocab] (modified in place) and records the token in the sequence state.
  SampleResult sample(uint32_t seq_id, float* logits, const SamplingParams& p);

 private:
  int vocab_;
  std::vector<int32_t> eos_ids_;
  std::unordered_map<uint32_t, SeqSamplingState> states_;
};

}  // namespace loraplex
