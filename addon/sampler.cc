#include "addon/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>

namespace loraplex {

namespace {

// Index of the first maximum (as torch.argmax). The obvious loop carries `chosen` through a cmov
// and a dependent load of logits[chosen] (~7 cycles an element: 3.6 ms for 16 x 49152 logits);
// 16 independent running maxima, then a scan for the first index holding the maximum, vectorise.
int32_t argmax_first(const float* x, int V) {
  constexpr int L = 16;
  float m[L];
  for (int l = 0; l < L; l++) m[l] = -INFINITY;
  int i = 0;
  for (; i + L <= V; i += L)
    for (int l = 0; l < L; l++) m[l] = x[i + l] > m[l] ? x[i + l] : m[l];
  float best = -INFINITY;
  for (int l = 0; l < L; l++) best = m[l] > best ? m[l] : best;
  for (; i < V; i++) best = x[i] > best ? x[i] : best;
  for (int j = 0; j < V; j++)
    if (x[j] == best) return j;
  return 0;  // every logit NaN or -inf: the first, as the plain loop gives
}

// True if every x[i] is finite. x * 0 is 0 for finite x and NaN for inf/NaN; 16 independent
// accumulators keep it vectorisable without -ffast-math.
bool all_finite(const float* x, int V) {
  constexpr int L = 16;
  float acc[L] = {};
  int i = 0;
  for (; i + L <= V; i += L)
    for (int l = 0; l < L; l++) acc[l] += x[i + l] * 0.f;
  float tail = 0.f;
  for (; i < V; i++) tail += x[i] * 0.f;
  for (int l = 0; l < L; l++) tail += acc[l];
  return tail == 0.f;
}

}  // namespace

RowLogprobs row_logprobs(const float* logits, int V, int32_t target, int n_top) {
  RowLogprobs r;
  float mx = -INFINITY;
  for (int i = 0; i < V; i++) mx = std::max(mx, logits[i]);
  double sum = 0.0;
  for (int i = 0; i < V; i++) sum += std::exp(double(logits[i]) - mx);
  const float lse = mx + float(std::log(sum));
  const float t = logits[target];
  r.logprob = t - lse;
  // Rank as vLLM counts it: 1 + the number of tokens with a strictly higher logit.
  int higher = 0;
  for (int i = 0; i < V; i++) higher += logits[i] > t;
  r.rank = higher + 1;
  const int n = std::min(std::max(n_top, 0), V);
  if (n > 0) {
    std::vector<int32_t> idx(V);
    std::iota(idx.begin(), idx.end(), 0);
    std::partial_sort(idx.begin(), idx.begin() + n, idx.end(),
                      [&](int a, int b) { return logits[a] != logits[b] ? logits[a] > logits[b] : a < b; });
    r.top_ids.assign(idx.begin(), idx.begin() + n);
    for (int i = 0; i < n; i++) r.top_logprobs.push_back(logits[idx[i]] - lse);
  }
  return r;
}

void Sampler::add_sequence(uint32_t seq_id, bool seeded, uint64_t seed, const int32_t* prompt, int n_prompt) {
  SeqSamplingState st;
  if (seeded) {
    st.rng.seed(seed);
  } else {
    std::random_device rd;
    st.rng.seed((uint64_t(rd()) << 32) ^ rd());
  }
  st.in_prompt.assign(vocab_, 0);
  for (int i = 0; i < n_prompt; i++)
    if (prompt[i] >= 0 && prompt[i] < vocab_) st.in_prompt[prompt[i]] = 1;
  states_[seq_id] = std::move(st);
}

SampleResult Sampler::sample(uint32_t seq_id, float* logits, const SamplingParams& p) {
  auto it = states_.find(seq_id);
  if (it == states_.end()) throw std::runtime_error("sampling for unknown sequence " + std::to_string(seq_id));
  SeqSamplingState& st = it->second;
  const int V = vocab_;
  SampleResult r;
  // A NaN or infinite logit means the forward pass broke down for this sequence: report it
  // (token -1) instead of sampling garbage; the engine ends the sequence with an error.
  if (!all_finite(logits, V)) {
    r.token = -1;
    r.logprob = NAN;
    return r;
  }
  // Grammar-constrained: tokens the grammar does not allow now are -inf before anything else, so
  // no bias, penalty or sampling setting can bring them back.
  if (p.mask) {
    for (int w = 0; w * 32 < V; w++) {
      const uint32_t bits = uint32_t(p.mask[w]);
      if (bits == 0xFFFFFFFFu) continue;
      const int end = std::min(V, w * 32 + 32);
      for (int t = w * 32; t < end; t++)
        if (!((bits >> (t & 31)) & 1u)) logits[t] = -INFINITY;
    }
  }

  // Raw logprobs: log_softmax of the unprocessed logits (after the grammar mask, as vLLM v1 reports
  // constrained requests: its bitmask is applied to the logits before the sampler sees them). The log-sum-exp over the vocabulary is
  // only paid for when the request asked for logprobs (num_logprobs >= 0).
  const bool want_lp = p.num_logprobs >= 0;
  float lse = NAN;
  if (want_lp) {
    float mx = -INFINITY;
    for (int i = 0; i < V; i++) mx = std::max(mx, logits[i]);
    double sum = 0.0;
    for (int i = 0; i < V; i++) sum += std::exp(double(logits[i]) - mx);
    lse = mx + float(std::log(sum));
  }
  std::vector<int32_t> top;
  if (p.num_logprobs > 0) {
    const int n = std::min(p.num_logprobs, V);
    top.resize(V);
    std::iota(top.begin(), top.end(), 0);
    std::partial_sort(top.begin(), top.begin() + n, top.end(), [&](int a, int b) {
      return logits[a] != logits[b] ? logits[a] > logits[b] : a < b;
    });
    top.resize(n);
  }
  std::vector<float> raw_top(top.size());
  for (size_t i = 0; i < top.size(); i++) raw_top[i] = logits[top[i]] - lse;
  // The chosen token's raw logprob needs its unprocessed logit; keep a copy only when processing
  // will change the logits.
  const bool modifies = want_lp && (p.temperature >= 1e-5f || p.repetition_penalty != 1.f || p.presence_penalty != 0.f ||
                        p.frequency_penalty != 0.f || p.suppress_eos || p.n_bias > 0);
  std::vector<float> raw;
  if (modifies) raw.assign(logits, logits + V);

  // logit_bias first, as vLLM's logits processors run before the penalties: +100 all but forces a
  // token, -100 all but bans it. Reported logprobs stay raw (above).
  for (int k = 0; k < p.n_bias; k++) logits[p.bias_ids[k]] += p.bias_values[k];

  // Penalties (vLLM semantics): repetition over prompt + output, presence/frequency over output.
  if (p.repetition_penalty != 1.f) {
    auto pen = [&](int t) {
      logits[t] = logits[t] > 0 ? logits[t] / p.repetition_penalty : logits[t] * p.repetition_penalty;
    };
    for (int t = 0; t < V; t++)
      if (st.in_prompt[t] || st.out_counts.count(t)) pen(t);
  }
  if (p.presence_penalty != 0.f || p.frequency_penalty != 0.f)
    for (auto& [t, c] : st.out_counts) logits[t] -= p.frequency_penalty * float(c) + p.presence_penalty;
  if (p.suppress_eos)
    for (int32_t e : eos_ids_)
      if (e >= 0 && e < V) logits[e] = -INFINITY;

  // Records the token in the sequence state and fills the result (logprob from the raw logit).
  auto finish = [&](int32_t chosen) {
    st.out_counts[chosen]++;
    r.token = chosen;
    r.logprob = want_lp ? (modifies ? raw[chosen] : logits[chosen]) - lse : NAN;
    r.top_ids = std::move(top);
    r.top_logprobs = std::move(raw_top);
    return r;
  };
  int32_t chosen = 0;
  if (p.temperature < 1e-5f) {
    chosen = argmax_first(logits, V);
  } else {
    for (int i = 0; i < V; i++) logits[i] /= p.temperature;
    if (p.top_k <= 0 && p.top_p >= 1.f && p.min_p <= 0.f) {
      // Plain temperature sampling needs no ordering: two passes over the vocabulary instead of
      // sorting it (a sort of 49k logits per token cost milliseconds).
      float m = -INFINITY;
      for (int i = 0; i < V; i++) m = std::max(m, logits[i]);
      double z = 0.0;
      for (int i = 0; i < V; i++) z += std::exp(double(logits[i]) - m);
      std::uniform_real_distribution<double> U(0.0, z);
      double u = U(st.rng), cum = 0.0;
      chosen = V - 1;
      while (chosen > 0 && !(logits[chosen] > -INFINITY)) chosen--;  // last finite one, if u hits z
      for (int i = 0; i < V; i++) {
        cum += std::exp(double(logits[i]) - m);
        if (u < cum) {
          chosen = i;
          break;
        }
      }
      return finish(chosen);
    }
    std::vector<int32_t> idx(V);
    std::iota(idx.begin(), idx.end(), 0);
    int keep = V;
    if (p.top_k > 0 && p.top_k < V) {
      keep = p.top_k;
      std::partial_sort(idx.begin(), idx.begin() + keep, idx.end(),
                        [&](int a, int b) { return logits[a] != logits[b] ? logits[a] > logits[b] : a < b; });
    } else {
      std::sort(idx.begin(), idx.end(),
                [&](int a, int b) { return logits[a] != logits[b] ? logits[a] > logits[b] : a < b; });
    }
    // Softmax over the kept candidates (sorted descending).
    std::vector<double> prob(keep);
    const double top_logit = logits[idx[0]];
    double z = 0.0;
    for (int i = 0; i < keep; i++) z += (prob[i] = std::exp(double(logits[idx[i]]) - top_logit));
    for (auto& x : prob) x /= z;
    if (p.top_p < 1.f) {  // smallest prefix whose mass reaches top_p (at least one token)
      double cum = 0.0;
      int n = 0;
      while (n < keep) {
        cum += prob[n++];
        if (cum >= p.top_p) break;
      }
      keep = n;
    }
    if (p.min_p > 0.f) {
      const double thr = p.min_p * prob[0];
      int n = 1;
      while (n < keep && prob[n] >= thr) n++;
      keep = n;
    }
    double mass = 0.0;
    for (int i = 0; i < keep; i++) mass += prob[i];
    std::uniform_real_distribution<double> U(0.0, mass);
    double u = U(st.rng), cum = 0.0;
    chosen = idx[keep - 1];
    for (int i = 0; i < keep; i++) {
      cum += prob[i];
      if (u < cum) {
        chosen = idx[i];
        break;
      }
    }
  }
  return finish(chosen);
}

}  // namespace loraplex
