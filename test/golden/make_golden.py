#!/usr/bin/env python3
"""Generate the golden reference fixtures for loraplex.

Run from anywhere:

    python3 test/golden/make_golden.py

Everything is written under test/golden/fixtures/ (the directory is wiped and
rebuilt).  With --families NAME[,NAME...] it builds only those model
families' fixtures (qwen3, gemma2, gemma3: see FAMILY_SPECS), replacing only
their own files, so the committed fixtures of the other models stay as they
are.  With --prompt-logprobs-only it only (re)writes the teacher-forced
fixtures/<name>.prompt-logprobs.json files, from the committed models, adapters
and cases, and touches nothing else:

    python3 test/golden/make_golden.py --prompt-logprobs-only
  Nothing is downloaded: the tokenizer is trained here on an inline
corpus and all models / adapters are random.  The output is deterministic: a
re-run with the same library versions gives byte-identical files.

The fixtures are a *reference*.  If a loraplex test disagrees with them, fix
loraplex, never the fixtures.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import json
import math
import platform
import shutil
import sys
import time
import warnings

import numpy
import peft
import safetensors
import safetensors.torch
import tokenizers
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer, decoders, models as tk_models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

warnings.filterwarnings("ignore")
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
try:
    import huggingface_hub.utils

    huggingface_hub.utils.disable_progress_bars()
except Exception:  # pragma: no cover - cosmetic only
    pass

# One thread: keeps CPU reductions in a fixed order (bit-reproducible output)
# and is polite on a shared machine.  The models are tiny anyway.
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "fixtures")

N_NEW = 16  # greedy tokens per case
TOP_K = 5

SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
BOS = "<|begin_of_text|>"
EOT = "<|eot_id|>"

# Llama-3 style chat template (written for this project).
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

# Training corpus for the tokenizer: original text written for this fixture.
CORPUS = [
    "Every morning the baker on Elm Street lights her oven at 4:15, long before "
    "the first tram rattles past. By 6 o'clock the windows are fogged, and the "
    "smell of warm bread drifts halfway down the block.",
    "The little café next to the station serves a strong espresso, a naïve "
    "attempt at a croissant, and, on Fridays, a surprisingly good crème brûlée. "
    "Regulars pay 3.50 for coffee; tourists somehow pay 4.75.",
    "Maria kept a notebook of train numbers: 1205, 1207, 3341 and the night "
    "express 9902. She wrote them down in pencil, one per line, and never "
    "explained why. Her brother said it was a code; she just laughed.",
    "When the river flooded in 1998 the water rose 2.3 metres in a single night. "
    "People carried chairs, lamps, and photo albums up to the second floor, "
    "then sat on the stairs and waited for the morning.",
    "A good recipe is short. Take 200 g of flour, 120 ml of water, 5 g of salt "
    "and a pinch of yeast. Mix, wait, fold, wait again. Bake at 230 degrees "
    "until the crust sings when you tap it.",
    "On her first trip to 日本 she learned three words, bought too many "
    "notebooks, and ate ramen at midnight in a tiny shop near the station. "
    "The owner drew a smiling cat on the receipt. 🙂",
    "Questions worth asking: What is the plan? Who pays for it? How long will "
    "it take -- really? If nobody can answer, the plan is not ready yet!",
    "The model reads tokens, one after another, and guesses what comes next. "
    "It is not magic; it is arithmetic, repeated many thousands of times, with "
    "numbers like 0.125, 42, and 1e-5 hiding in every layer.",
    "Our garden has tomatoes, beans, and a stubborn lemon tree that gives "
    "exactly four lemons each year. We name them. This year: Ada, Bruno, "
    "Chloé and Dmitri.",
    "Weather report for Tuesday: cloudy at dawn, sunny by noon, 18 to 24 "
    "degrees, with a light wind from the west. Take a jacket anyway.",
]

TRAIN_VOCAB = 592  # + 5 special tokens = 597 -> model vocab padded to 600


def rel(path):
    return os.path.relpath(path, FIX).replace(os.sep, "/")


def f9(x):
    """A float32 value printed with 9 significant digits (exact round trip)."""
    return float(f"{float(x):.9g}")


# --------------------------------------------------------------------------
# 1. Tokenizer
# --------------------------------------------------------------------------


def build_tokenizer():
    tok = Tokenizer(tk_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TRAIN_VOCAB,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    # Special tokens come after the learned vocabulary, as in Llama 3.
    tok.add_special_tokens(SPECIAL_TOKENS)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B:1",
        special_tokens=[(BOS, bos_id)],
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOT,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=256,
    )
    return tok, hf


def save_tokenizer(hf_tok, model_dir):
    hf_tok.save_pretrained(model_dir, save_jinja_files=False)
    cfg_path = os.path.join(model_dir, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    assert cfg.get("chat_template") == CHAT_TEMPLATE, "chat_template missing from tokenizer_config.json"
    # The conventional class name for a tokenizer.json-only tokenizer.
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    write_json(cfg_path, cfg)
    assert not os.path.exists(os.path.join(model_dir, "chat_template.jinja"))


TOKENIZE_TEXTS = [
    ("Hello, world!", True),
    ("Hello, world!", False),
    ("The café serves a naïve crème brûlée for 4.75 — 日本 🙂🦙", True),
    ("Train 1205 left at 23:59; 3.14159 * 2 = 6.28318.", True),
    ("  leading spaces,\tTabs\t\tand   runs   of spaces  \n\n\nthen newlines\n", True),
    ("", True),
    ("", False),
    ("<|start_header_id|>user<|end_header_id|>\n\nHi there!<|eot_id|>", True),
    ("<|begin_of_text|>already has bos<|end_of_text|>", False),
    ("ÀÉÎÕÜ ñ ß Ω Ж 中文 한국어 🎉🎉 zwj: 👩‍💻", True),
]

CHATS = [
    (
        [
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "What is 12 times 7?"},
        ],
        True,
    ),
    (
        [
            {"role": "user", "content": "  Recommend a café in 日本, please! 🙂  "},
        ],
        True,
    ),
    (
        [
            {"role": "system", "content": "Answer in one sentence."},
            {"role": "user", "content": "Why does bread rise?"},
            {"role": "assistant", "content": "Yeast makes gas, and the gas is trapped by gluten."},
            {"role": "user", "content": "And at 230 degrees?\nIt bakes."},
        ],
        False,
    ),
]


def check_tokenizer(raw_tok, hf_tok, model_dir):
    """Reload from disk and check that the reloaded tokenizer agrees with the
    raw `tokenizers` object and round-trips text.  Returns the JSON sections."""
    # PreTrainedTokenizerFast loads tokenizer.json exactly as written.  (In
    # transformers 5, AutoTokenizer picks a model-specific class from
    # config.json's model_type, e.g. Qwen2Tokenizer, which may add tokens of
    # its own; that path is only compared, see auto_tokenizer_diff below.)
    re_hf = PreTrainedTokenizerFast.from_pretrained(model_dir)
    re_raw = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    bos_id = raw_tok.token_to_id(BOS)
    assert re_hf.bos_token_id == bos_id and re_hf.eos_token_id == raw_tok.token_to_id(EOT)
    assert len(re_hf) == len(hf_tok) == raw_tok.get_vocab_size(with_added_tokens=True)

    tokenize = []
    for text, add_special in TOKENIZE_TEXTS:
        ids = re_hf(text, add_special_tokens=add_special)["input_ids"]
        ids2 = re_raw.encode(text, add_special_tokens=add_special).ids
        ids3 = raw_tok.encode(text, add_special_tokens=add_special).ids
        assert ids == ids2 == ids3, (text, ids, ids2, ids3)
        if add_special:
            assert ids[:1] == [bos_id], (text, ids)
        dec = re_hf.decode(ids, skip_special_tokens=False)
        expect = (BOS if add_special else "") + text
        assert dec == expect, (dec, expect)
        tokenize.append({"text": text, "add_special_tokens": add_special, "ids": ids})

    chat = []
    for messages, agp in CHATS:
        text = re_hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=agp)
        assert isinstance(text, str)
        assert text.startswith(BOS)
        # The template already contains the BOS token: encode without adding it.
        ids = re_hf(text, add_special_tokens=False)["input_ids"]
        tok_out = re_hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=agp)
        if not isinstance(tok_out, list):
            tok_out = tok_out["input_ids"]
        assert tok_out == ids, (tok_out, ids)
        assert ids.count(bos_id) == 1
        assert re_hf.decode(ids, skip_special_tokens=False) == text
        chat.append({"messages": messages, "add_generation_prompt": agp, "text": text, "ids": ids})
    return re_hf, tokenize, chat


def auto_tokenizer_diff(model_dir, tokenize):
    """Informational: does AutoTokenizer (model-type specific class in
    transformers 5) agree with tokenizer.json on the fixture texts?"""
    auto = AutoTokenizer.from_pretrained(model_dir)
    bad = [
        t["text"]
        for t in tokenize
        if auto(t["text"], add_special_tokens=t["add_special_tokens"])["input_ids"] != t["ids"]
    ]
    return type(auto).__name__, len(auto), bad


# --------------------------------------------------------------------------
# 2. Models
# --------------------------------------------------------------------------


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")


def randomize_model(model, seed, n_real_vocab, std, emb_std, bias_std=0.1, norm_centre=1.0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied weights appear once
            if "norm" in name:
                # Gemma's RMSNorm multiplies by (1 + w): centre its weights on 0, not 1.
                p.copy_(norm_centre + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(bias_std * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name or "lm_head" in name:
                p.copy_(emb_std * torch.randn(p.shape, generator=g))
                p[n_real_vocab:].zero_()  # padding rows: never produced by the tokenizer
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))


def legacy_rope_keys(config_path):
    """transformers 5 writes `rope_parameters` (with rope_theta inside).  Real
    checkpoints in the wild mostly carry the older `rope_theta` +
    `rope_scaling` keys (and `torch_dtype`).  Write both spellings, with the
    same meaning, so a loader reading either finds the right values."""
    with open(config_path) as f:
        cfg = json.load(f)
    rp = dict(cfg["rope_parameters"])
    cfg["rope_theta"] = rp.pop("rope_theta")
    cfg["rope_scaling"] = None if rp.get("rope_type", "default") == "default" else rp
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg["dtype"]
    write_json(config_path, cfg)


def load_fp32(model_dir):
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    m.eval()
    for p in m.parameters():
        assert p.dtype == torch.float32
    return m


def pad8(n):
    return (n + 7) // 8 * 8


def model_specs(n_vocab, bos_id, eot_id, eot_alt_id):
    V = pad8(n_vocab)
    common = dict(vocab_size=V, bos_token_id=bos_id, eos_token_id=eot_id, pad_token_id=None)
    return [
        dict(
            name="llama-gqa",
            cls=LlamaForCausalLM,
            config=LlamaConfig(
                hidden_size=64,
                intermediate_size=176,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                rms_norm_eps=1e-5,
                max_position_embeddings=256,
                **common,
            ),
            save_dtype=torch.float32,
            seed=101,
        ),
        dict(
            name="qwen2-tied",
            cls=Qwen2ForCausalLM,
            config=Qwen2Config(
                hidden_size=64,
                intermediate_size=160,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                tie_word_embeddings=True,
                rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
                use_sliding_window=False,
                rms_norm_eps=1e-6,
                max_position_embeddings=256,
                **common,
            ),
            save_dtype=torch.float32,
            seed=202,
        ),
        dict(
            name="llama3-bf16",
            cls=LlamaForCausalLM,
            config=LlamaConfig(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=1,
                tie_word_embeddings=True,
                rope_parameters={
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                    "rope_theta": 500000.0,
                },
                rms_norm_eps=1e-5,
                max_position_embeddings=256,
                **common,
            ),
            save_dtype=torch.bfloat16,
            seed=303,
            gen_eos=[eot_id, eot_alt_id],  # list form, as Llama 3.x ships it
        ),
        dict(
            name="mistral-sharded",
            cls=MistralForCausalLM,
            config=MistralConfig(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=24,
                sliding_window=16,
                tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                rms_norm_eps=1e-5,
                max_position_embeddings=256,
                **common,
            ),
            save_dtype=torch.float32,
            seed=404,
            max_shard_size="300KB",
        ),
        dict(
            name="llama-f16",
            cls=LlamaForCausalLM,
            config=LlamaConfig(
                hidden_size=32,
                intermediate_size=88,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=2,
                tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                rms_norm_eps=1e-5,
                max_position_embeddings=256,
                **common,
            ),
            save_dtype=torch.float16,
            seed=505,
            std=0.1,
            emb_std=0.3,
        ),
    ]


def build_model(spec, hf_tok, n_vocab, bos_id, eot_id):
    name = spec["name"]
    model_dir = os.path.join(FIX, "models", name)
    os.makedirs(model_dir)
    torch.manual_seed(spec["seed"])
    config = spec["config"]
    config._attn_implementation = "eager"
    model = spec["cls"](config)
    # std 0.15 for the projections: with tied embeddings and smaller values the
    # residual stream is dominated by the input embedding and greedy decoding
    # degenerates into repeating one token.
    randomize_model(
        model,
        spec["seed"],
        n_vocab,
        std=spec.get("std", 0.15),
        emb_std=spec.get("emb_std", 0.2),
        norm_centre=spec.get("norm_centre", 1.0),
    )
    model.generation_config = GenerationConfig(
        bos_token_id=bos_id, eos_token_id=spec.get("gen_eos", eot_id), pad_token_id=None
    )
    model = model.to(spec["save_dtype"])
    kw = {}
    if "max_shard_size" in spec:
        kw["max_shard_size"] = spec["max_shard_size"]
    model.save_pretrained(model_dir, safe_serialization=True, **kw)
    spec.get("legacy_keys", legacy_rope_keys)(os.path.join(model_dir, "config.json"))
    save_tokenizer(hf_tok, model_dir)

    # Sanity: the reloaded config means what we asked for.
    intended = config.rope_parameters
    re_model = load_fp32(model_dir)
    # (A legacy rope_scaling "type" key is kept next to "rope_type" by transformers: same meaning.)
    got = {k: v for k, v in re_model.config.rope_parameters.items() if k != "type"}
    assert got == intended, (re_model.config.rope_parameters, intended)
    if getattr(config, "layer_types", None) is not None:
        assert re_model.config.layer_types == config.layer_types, (re_model.config.layer_types, config.layer_types)
    if "max_shard_size" in spec:
        shards = [f for f in os.listdir(model_dir) if f.startswith("model-") and f.endswith(".safetensors")]
        assert len(shards) >= 2 and os.path.exists(os.path.join(model_dir, "model.safetensors.index.json"))
    # Saved dtype really is the requested one.
    for fn in os.listdir(model_dir):
        if fn.endswith(".safetensors"):
            for t in safetensors.torch.load_file(os.path.join(model_dir, fn)).values():
                assert t.dtype == spec["save_dtype"], (fn, t.dtype)
    return model_dir, re_model


def qwen_bias_check(model):
    n = 0
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            assert p.abs().min() > 0 and p.abs().mean() > 1e-2, name
            n += 1
    assert n > 0


def sliding_window_check(model_dir, seq):
    """Is the sliding window really applied by transformers?  Compare the
    windowed model with the same weights loaded without a window."""
    win = load_fp32(model_dir)
    cfg = transformers.AutoConfig.from_pretrained(model_dir)
    cfg.sliding_window = None
    nowin = AutoModelForCausalLM.from_pretrained(model_dir, config=cfg, dtype=torch.float32, attn_implementation="eager").eval()
    W = win.config.sliding_window
    x = torch.tensor([seq])
    with torch.no_grad():
        a = win(x).logits[0]
        b = nowin(x).logits[0]
    short_same = torch.allclose(a[:W], b[:W], atol=1e-6, rtol=0)  # positions 0..W-1 see <= W keys
    long_diff = (a[W:] - b[W:]).abs().max().item() > 1e-4
    assert short_same, "windowed and non-windowed models differ inside the window"
    if long_diff:
        # Pin down the exact window semantics with a one-layer cut of the same
        # weights: RoPE is relative, so with a window of W keys the windowed
        # output at position i must equal the unwindowed output computed on
        # tokens i-W+1 .. i alone.
        cfg1 = transformers.AutoConfig.from_pretrained(model_dir)
        cfg1.num_hidden_layers = 1
        win1 = AutoModelForCausalLM.from_pretrained(model_dir, config=cfg1, dtype=torch.float32, attn_implementation="eager").eval()
        cfg1n = transformers.AutoConfig.from_pretrained(model_dir)
        cfg1n.num_hidden_layers = 1
        cfg1n.sliding_window = None
        nowin1 = AutoModelForCausalLM.from_pretrained(model_dir, config=cfg1n, dtype=torch.float32, attn_implementation="eager").eval()
        with torch.no_grad():
            full = win1(x).logits[0]
            for i in range(W, len(seq)):
                same = nowin1(torch.tensor([seq[i - W + 1 : i + 1]])).logits[0, -1]
                wider = nowin1(torch.tensor([seq[i - W : i + 1]])).logits[0, -1]
                assert torch.allclose(full[i], same, atol=1e-4, rtol=0), ("window semantics", i)
                assert not torch.allclose(full[i], wider, atol=1e-4, rtol=0), ("window semantics", i)
    return bool(long_diff)


# --------------------------------------------------------------------------
# 3. Adapters
# --------------------------------------------------------------------------

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

ADAPTERS = {
    "llama-gqa": [
        dict(name="r8-all", lora=dict(r=8, lora_alpha=16, target_modules=ALL7)),
        dict(name="r64-qv-rslora", lora=dict(r=64, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=True)),
        dict(name="r4-mlp", lora=dict(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"])),
        dict(
            name="r2-attn-named-keys",
            lora=dict(r=2, lora_alpha=5, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
            named_keys=True,
        ),
    ],
    "qwen2-tied": [
        dict(name="r2-all-layer1", lora=dict(r=2, lora_alpha=6, target_modules=ALL7, layers_to_transform=[1])),
        dict(
            name="r32-attn-patterns",
            lora=dict(
                r=32,
                lora_alpha=16,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                rank_pattern={"v_proj": 4},
                alpha_pattern={"model.layers.1.self_attn.q_proj": 64},
            ),
        ),
    ],
    "llama3-bf16": [
        dict(name="r8-qv-rslora", lora=dict(r=8, lora_alpha=4, target_modules=["q_proj", "v_proj"], use_rslora=True)),
        dict(
            name="r16-mlp-patterns",
            lora=dict(
                r=16,
                lora_alpha=32,
                target_modules=["gate_proj", "up_proj", "down_proj"],
                rank_pattern={"model.layers.0.mlp.down_proj": 2},
                alpha_pattern={"down_proj": 64},
            ),
        ),
    ],
    "mistral-sharded": [
        dict(name="r4-all", lora=dict(r=4, lora_alpha=12, target_modules=ALL7)),
        dict(
            name="r32-attn-rslora-pattern",
            lora=dict(
                r=32,
                lora_alpha=12,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                use_rslora=True,
                rank_pattern={"k_proj": 8},
            ),
        ),
    ],
    "llama-f16": [
        dict(name="r1-o", lora=dict(r=1, lora_alpha=4, target_modules=["o_proj"])),
        dict(name="r16-regex-qv", lora=dict(r=16, lora_alpha=8, target_modules=r".*\.(q_proj|v_proj)$")),
    ],
}

LORA_STD = 0.15


# --------------------------------------------------------------------------
# 3b. Model families beyond Llama (issue #16): one fixture each, written by
#     `--families`, which leaves every other fixture untouched.
# --------------------------------------------------------------------------


def gemma2_legacy_keys(config_path):
    """Released Gemma 2 configs carry rope_theta and no layer_types (HF then
    alternates: even layers slide).  Write that spelling."""
    legacy_rope_keys(config_path)
    with open(config_path) as f:
        cfg = json.load(f)
    del cfg["layer_types"]
    write_json(config_path, cfg)


def gemma3_legacy_keys(config_path):
    """Released Gemma 3 configs carry sliding_window_pattern instead of
    layer_types, and rope_theta (global) + rope_local_base_freq (sliding) +
    rope_scaling (global layers only) instead of per-layer-type
    rope_parameters.  Write that spelling; the reload check in build_model
    proves transformers derives the same layer types and RoPE settings."""
    with open(config_path) as f:
        cfg = json.load(f)
    rp = cfg.pop("rope_parameters")
    full = dict(rp["full_attention"])
    cfg["rope_theta"] = full.pop("rope_theta")
    cfg["rope_local_base_freq"] = rp["sliding_attention"]["rope_theta"]
    cfg["rope_scaling"] = full if full.get("rope_type", "default") != "default" else None
    del cfg["layer_types"]
    cfg.pop("_sliding_window_pattern", None)
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg["dtype"]
    write_json(config_path, cfg)


def phi3_legacy_keys(config_path):
    """Released Phi-3.5 / Phi-4-mini configs: rope_theta, partial_rotary_factor and
    original_max_position_embeddings at the top level, rope_scaling holding
    {type: longrope, short_factor, long_factor}.  Write that spelling."""
    with open(config_path) as f:
        cfg = json.load(f)
    rp = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rp.pop("rope_theta")
    cfg["partial_rotary_factor"] = rp.pop("partial_rotary_factor")
    rp.pop("original_max_position_embeddings", None)
    rp["type"] = rp.pop("rope_type")
    cfg["rope_scaling"] = rp
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg["dtype"]
    write_json(config_path, cfg)


def family_specs(n_vocab, bos_id, eot_id):
    V = pad8(n_vocab)
    common = dict(vocab_size=V, bos_token_id=bos_id, eos_token_id=eot_id, pad_token_id=None)
    return [
        dict(
            # Qwen3: q_norm / k_norm, head_dim 16 != hidden / heads (12), tied embeddings.
            name="qwen3-tied",
            cls=Qwen3ForCausalLM,
            config=Qwen3Config(
                hidden_size=48,
                intermediate_size=96,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                rms_norm_eps=1e-6,
                max_position_embeddings=256,
                **common,
            ),
            save_dtype=torch.float32,
            seed=606,
        ),
        dict(
            # Gemma 2: sqrt(hidden) embeddings, (1 + w) norms, four norms per layer, GeGLU,
            # query_pre_attn_scalar (24, not head_dim), soft-capping small enough to clip (attention
            # 4, logits 6), sliding window 8 on the even layers (shorter than every prompt).
            name="gemma2",
            cls=Gemma2ForCausalLM,
            config=Gemma2Config(
                hidden_size=48,
                intermediate_size=96,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                query_pre_attn_scalar=24,
                sliding_window=8,
                attn_logit_softcapping=4.0,
                final_logit_softcapping=6.0,
                hidden_activation="gelu_pytorch_tanh",
                tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                rms_norm_eps=1e-6,
                max_position_embeddings=256,
                **common,
            ),
            save_dtype=torch.float32,
            seed=707,
            norm_centre=0.0,
            legacy_keys=gemma2_legacy_keys,
            softcap_check=True,
        ),
        dict(
            # Gemma 3 (text): Gemma 2 plus q/k norm, sliding_window_pattern 3 (layers 0 and 1 slide,
            # layer 2 is global), a local RoPE base for sliding layers and linear scaling on the
            # global one; no soft-capping.
            name="gemma3",
            cls=Gemma3ForCausalLM,
            config=Gemma3TextConfig(
                hidden_size=48,
                intermediate_size=96,
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=1,
                head_dim=16,
                query_pre_attn_scalar=24,
                sliding_window=8,
                sliding_window_pattern=3,
                hidden_activation="gelu_pytorch_tanh",
                tie_word_embeddings=True,
                rope_parameters={
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                    "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
                },
                rms_norm_eps=1e-6,
                max_position_embeddings=256,
                **common,
            ),
            save_dtype=torch.float32,
            seed=808,
            norm_centre=0.0,
            legacy_keys=gemma3_legacy_keys,
            multimodal_check=True,
        ),
        dict(
            # Phi-3 / Phi-4-mini: fused qkv_proj and gate_up_proj, partial rotary 0.75 (12 of 16
            # dimensions), longrope with original_max_position_embeddings 32 (prompts of 32 and 41
            # tokens start past it, the 19-token one crosses it while generating), sliding window
            # 24 on every layer, tied embeddings as Phi-4-mini.
            name="phi3",
            cls=Phi3ForCausalLM,
            config=Phi3Config(
                hidden_size=48,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=3,
                num_key_value_heads=1,
                max_position_embeddings=128,
                original_max_position_embeddings=32,
                sliding_window=24,
                tie_word_embeddings=True,
                rope_parameters={
                    "rope_type": "longrope",
                    "rope_theta": 10000.0,
                    "partial_rotary_factor": 0.75,
                    "short_factor": [1.0, 1.05, 1.1, 1.3, 1.6, 2.0],
                    "long_factor": [1.0, 1.5, 2.5, 4.0, 7.0, 12.0],
                    "original_max_position_embeddings": 32,
                },
                rms_norm_eps=1e-5,
                **common,
            ),
            save_dtype=torch.float32,
            seed=909,
            legacy_keys=phi3_legacy_keys,
            phi3_check=True,
        ),
    ]


FAMILY_ADAPTERS = {
    "qwen3-tied": [
        dict(name="r8-all", lora=dict(r=8, lora_alpha=16, target_modules=ALL7)),
        dict(
            name="r4-attn-patterns",
            lora=dict(
                r=4,
                lora_alpha=8,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                rank_pattern={"k_proj": 2},
                alpha_pattern={"model.layers.1.self_attn.o_proj": 12},
            ),
        ),
    ],
    "gemma2": [
        dict(name="r8-all", lora=dict(r=8, lora_alpha=16, target_modules=ALL7)),
        dict(name="r4-mlp-rslora", lora=dict(r=4, lora_alpha=6, target_modules=["gate_proj", "up_proj", "down_proj"], use_rslora=True)),
    ],
    "phi3": [
        dict(name="r8-fused", lora=dict(r=8, lora_alpha=16, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])),
        dict(
            name="r4-qkv-gate-up-patterns",
            lora=dict(
                r=4,
                lora_alpha=8,
                target_modules=["qkv_proj", "gate_up_proj"],
                rank_pattern={"gate_up_proj": 2},
                alpha_pattern={"model.layers.1.self_attn.qkv_proj": 12},
            ),
        ),
    ],
    "gemma3": [
        dict(name="r8-all", lora=dict(r=8, lora_alpha=16, target_modules=ALL7)),
        dict(
            name="r16-qv-layer2",
            lora=dict(r=16, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"down_proj": 4}),
        ),
    ],
}
ADAPTERS.update(FAMILY_ADAPTERS)


def multimodal_text_check(model_dir, seq):
    """Gemma3ForConditionalGeneration (the 4B-27B releases) on text is its language
    model: build one around this fixture's weights (a tiny random SigLIP vision
    tower) and require HF's logits to equal Gemma3ForCausalLM's exactly, so this
    fixture's outputs are also the multimodal checkpoint's (the loraplex test
    renames the tensors into that layout, test/golden/gemma3-multimodal.test.ts)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    causal = load_fp32(model_dir)
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
    cfg = Gemma3Config(text_config=causal.config.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    mm = Gemma3ForConditionalGeneration(cfg).eval()
    lm = {k[len("model."):]: v for k, v in causal.state_dict().items() if k.startswith("model.")}
    mm.model.language_model.load_state_dict(lm, strict=True)
    x = torch.tensor([seq])
    with torch.no_grad():
        d = (mm(input_ids=x).logits - causal(x).logits).abs().max().item()
    assert d == 0.0, ("Gemma3ForConditionalGeneration text logits differ from Gemma3ForCausalLM", d)
    return True


def phi3_check(model_dir, tok):
    """Do longrope's two factor sets and the sliding window really act here?  The
    same weights with long_factor = short_factor (a prompt past the original
    context) and without the window must give different logits; and a prompt
    within the original context must not depend on long_factor."""
    base = load_fp32(model_dir)
    long_ids = tok(BASE_PROMPTS[3], add_special_tokens=True)["input_ids"]
    short_ids = tok(BASE_PROMPTS[1], add_special_tokens=True)["input_ids"]
    assert len(long_ids) > base.config.rope_parameters["original_max_position_embeddings"] >= len(short_ids)
    out = {}
    with torch.no_grad():
        a_long, a_short = base(torch.tensor([long_ids])).logits[0], base(torch.tensor([short_ids])).logits[0]
        cfg = transformers.AutoConfig.from_pretrained(model_dir)
        cfg.rope_parameters = dict(cfg.rope_parameters, long_factor=list(cfg.rope_parameters["short_factor"]))
        m = AutoModelForCausalLM.from_pretrained(model_dir, config=cfg, dtype=torch.float32, attn_implementation="eager").eval()
        out["long_factor_changes_long_prompt"] = f9((m(torch.tensor([long_ids])).logits[0] - a_long).abs().max().item())
        assert out["long_factor_changes_long_prompt"] > 1e-2
        assert torch.equal(m(torch.tensor([short_ids])).logits[0], a_short), "long_factor acted within the original context"
        cfg = transformers.AutoConfig.from_pretrained(model_dir)
        cfg.sliding_window = None
        m = AutoModelForCausalLM.from_pretrained(model_dir, config=cfg, dtype=torch.float32, attn_implementation="eager").eval()
        out["sliding_window_changes_long_prompt"] = f9((m(torch.tensor([long_ids])).logits[0] - a_long).abs().max().item())
        assert out["sliding_window_changes_long_prompt"] > 1e-3
    return out


def softcap_check(model_dir, seq):
    """Does soft-capping actually clip in this fixture?  The same weights with
    each cap removed must give visibly different logits."""
    capped = load_fp32(model_dir)
    x = torch.tensor([seq])
    with torch.no_grad():
        a = capped(x).logits[0]
        out = {}
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            cfg = transformers.AutoConfig.from_pretrained(model_dir)
            setattr(cfg, key, None)
            m = AutoModelForCausalLM.from_pretrained(model_dir, config=cfg, dtype=torch.float32, attn_implementation="eager").eval()
            d = (m(x).logits[0] - a).abs().max().item()
            assert d > 1e-2, (key, "does not clip", d)
            out[key] = f9(d)
    return out


def lora_tensors(model):
    return {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if ".lora_A." in n or ".lora_B." in n
    }


def build_adapter(model_name, model_dir, spec, seed, notes):
    adir = os.path.join(FIX, "adapters", model_name, spec["name"])
    os.makedirs(adir)
    base = load_fp32(model_dir)
    cfg = LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, bias="none", init_lora_weights=False, **spec["lora"])
    pm = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if ".lora_A." in n or ".lora_B." in n:
                p.copy_(LORA_STD * torch.randn(p.shape, generator=g))
    # Check ranks / alphas / scalings per module, to be sure the patterns bite.
    ranks = {}
    for n, mod in pm.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            short = n.replace("base_model.model.", "", 1)
            ranks[short] = (mod.r["default"], mod.lora_alpha["default"], mod.scaling["default"])
            assert mod.lora_alpha["default"] != mod.r["default"], (short, "alpha == r")
    want = lora_tensors(pm)
    pm.peft_config["default"].base_model_name_or_path = rel(model_dir)
    pm.save_pretrained(adir, safe_serialization=True)
    # PEFT turns a target_modules list into a set and writes it back in hash
    # order, which changes from run to run: sort it.
    acfg_path = os.path.join(adir, "adapter_config.json")
    with open(acfg_path) as f:
        acfg = json.load(f)
    if isinstance(acfg.get("target_modules"), list):
        acfg["target_modules"] = sorted(acfg["target_modules"])
    write_json(acfg_path, acfg)
    readme = os.path.join(adir, "README.md")
    if os.path.exists(readme):
        os.remove(readme)
    st_path = os.path.join(adir, "adapter_model.safetensors")
    saved = safetensors.torch.load_file(st_path)
    for k, t in saved.items():
        assert t.dtype == torch.float32, (k, t.dtype)
        assert ".default." not in k

    if spec.get("named_keys"):
        renamed = {}
        for k, t in saved.items():
            k2 = k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
            assert k2 != k
            renamed[k2] = t
        safetensors.torch.save_file(renamed, st_path, metadata={"format": "pt"})

    # Reload: fresh base + PeftModel.from_pretrained, and verify every LoRA
    # tensor came back exactly (nothing silently re-initialised).
    base2 = load_fp32(model_dir)
    pm2 = PeftModel.from_pretrained(base2, adir)
    pm2.eval()
    got = lora_tensors(pm2)
    ok = set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    if spec.get("named_keys") and not ok:
        notes.append(
            f"{model_name}/{spec['name']}: PEFT {peft.__version__} does not load tensor names with an "
            "adapter-name segment (lora_A.default.weight); keys were written without it instead."
        )
        safetensors.torch.save_file(saved, st_path, metadata={"format": "pt"})
        base2 = load_fp32(model_dir)
        pm2 = PeftModel.from_pretrained(base2, adir).eval()
        got = lora_tensors(pm2)
        ok = set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert ok, f"adapter {adir} did not reload exactly"
    n_modules = len(ranks)
    return adir, pm2, ranks, n_modules


# --------------------------------------------------------------------------
# 4. Reference decoding
# --------------------------------------------------------------------------

BASE_PROMPTS = [  # 4, 19, 32 and 41 tokens with BOS
    "Every morning",
    "The café by the station opened at 7:30.",
    "Weather report for Tuesday: cloudy at dawn, sunny by noon, 18 to 24 degrees.",
    "In 1998 the river rose 2.3 metres; the old bridge, built in 1887, held.",
]

EXTRA_PROMPTS = [
    "Take 200 g of flour and",
    "Maria wrote the train numbers 1205, 1207 and",
    "日本 🙂 café naïve",
    "Questions worth asking: what is the plan, who pays, and",
    "The model reads tokens one after another and",
    "  Indented text\twith a tab",
    "Our garden has tomatoes, beans, and a stubborn lemon tree that gives exactly four lemons each year.",
]


@torch.no_grad()
def greedy(model, prompt_ids):
    ids = list(prompt_ids)
    steps = []
    gen = []
    for _ in range(N_NEW):
        logits = model(torch.tensor([ids], dtype=torch.long)).logits[0, -1].float()
        lp = torch.log_softmax(logits, dim=-1)
        vals, idx = torch.topk(lp, TOP_K)
        nxt = int(torch.argmax(logits).item())
        assert nxt == int(idx[0]), "argmax/topk disagree"
        top = [[int(i), f9(v)] for i, v in zip(idx.tolist(), vals.tolist())]
        margin = float(vals[0].double() - vals[1].double())
        steps.append({"top": top, "margin": f9(margin)})
        gen.append(nxt)
        ids.append(nxt)  # EOS is ignored on purpose
    return gen, steps


def run_cases(model, tok, prompts, adapter, n_real_vocab):
    cases = []
    for prompt in prompts:
        pids = tok(prompt, add_special_tokens=True)["input_ids"]
        gen, steps = greedy(model, pids)
        for s in steps:
            for i, _ in s["top"]:
                assert i < n_real_vocab, "padding vocab row reached the top-k"
        cases.append(
            {"adapter": adapter, "prompt": prompt, "prompt_ids": pids, "greedy_ids": gen, "steps": steps}
        )
    return cases


# --------------------------------------------------------------------------
# 5. Teacher-forced prompt logprobs (echo / prompt_logprobs)
# --------------------------------------------------------------------------

PL_DECIMALS = 6  # enough for a 1e-3 comparison, keeps the files small


def r6(x):
    return round(float(x), PL_DECIMALS)


@torch.no_grad()
def teacher_forced(model, ids):
    """One forward pass over `ids`; for each position i >= 1 the fp32 log-softmax
    of the logits at i - 1 (the distribution over token i given ids[:i]): the
    logprob and rank of ids[i], the top 5 and the top-2 margin.  Position 0 has
    no prediction (None)."""
    logits = model(torch.tensor([ids], dtype=torch.long)).logits[0].float()  # [T, V]
    lp = torch.log_softmax(logits, dim=-1)
    out = [None]
    for i in range(1, len(ids)):
        row = lp[i - 1]
        vals, idx = torch.topk(row, TOP_K)
        tok = ids[i]
        chosen = row[tok]
        # vLLM's rank: 1 + the number of tokens with a strictly higher logprob.
        rank = int((row > chosen).sum().item()) + 1
        out.append(
            {
                "logprob": r6(chosen),
                "rank": rank,
                "top": [[int(t), r6(v)] for t, v in zip(idx.tolist(), vals.tolist())],
                "margin": r6(vals[0].double() - vals[1].double()),
            }
        )
    return out


def write_prompt_logprobs_json(path, obj):
    """JSON with one line per position (the generic indent=2 layout would be
    ~4x larger): header keys, then each case's scalar keys and its positions."""
    d = lambda v: json.dumps(v, ensure_ascii=False, separators=(", ", ": "))
    lines = ["{"]
    for k in sorted(k for k in obj if k != "cases"):
        lines.append(f"  {d(k)}: {d(obj[k])},")
    lines.append('  "cases": [')
    for ci, c in enumerate(obj["cases"]):
        lines.append("    {")
        for k in ("adapter", "prompt", "n_prompt", "ids"):
            lines.append(f"      {d(k)}: {d(c[k])},")
        lines.append('      "positions": [')
        for pi, p in enumerate(c["positions"]):
            lines.append(f"        {d(p)}" + ("," if pi + 1 < len(c["positions"]) else ""))
        lines.append("      ]")
        lines.append("    }" + ("," if ci + 1 < len(obj["cases"]) else ""))
    lines.append("  ]")
    lines.append("}")
    text = "\n".join(lines) + "\n"
    assert json.loads(text) == json.loads(json.dumps(obj)), "prompt-logprobs serialisation"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def record_prompt_logprobs(name):
    """Teacher-forced logprobs for every case of fixtures/<name>.json, over the
    prompt ids followed by the case's 16 greedy ids, from the *saved* model and
    adapter files (fresh fp32 eager base, PeftModel.from_pretrained per
    adapter), written to fixtures/<name>.prompt-logprobs.json.  Reads the
    committed fixtures only; changes none of them."""
    with open(os.path.join(FIX, f"{name}.json"), encoding="utf-8") as f:
        golden = json.load(f)
    model_dir = os.path.join(FIX, golden["model"])
    base = load_fp32(model_dir)
    models = {None: base}
    cases = []
    worst_step = 0.0
    for c in golden["cases"]:
        a = c["adapter"]
        if a not in models:
            models[a] = PeftModel.from_pretrained(load_fp32(model_dir), os.path.join(FIX, a)).eval()
        ids = c["prompt_ids"] + c["greedy_ids"]
        pos = teacher_forced(models[a], ids)
        n = len(c["prompt_ids"])
        # Sanity: the teacher-forced continuation is the recorded greedy decoding
        # (same chosen logprobs up to fp32 reduction order).
        # LongRoPE (phi3): a forward over L tokens uses the long factors iff L > the original
        # context, so greedy step k (a forward over n + k tokens) and this one forward over all
        # n + 16 agree only where both are on the same side of it.
        rp = getattr(base.config, "rope_parameters", None) or {}
        orig = rp.get("original_max_position_embeddings") if rp.get("rope_type") == "longrope" else None
        for k, step in enumerate(c["steps"]):
            if orig is not None and (n + k > orig) != (len(ids) > orig):
                continue
            p = pos[n + k]
            assert p["logprob"] is not None
            diff = abs(p["logprob"] - step["top"][0][1])
            worst_step = max(worst_step, diff)
            assert diff < 1e-4, (name, a, c["prompt"], k, p["logprob"], step["top"][0])
            if step["margin"] > 1e-3:
                assert p["top"][0][0] == c["greedy_ids"][k] == step["top"][0][0], (name, a, k)
        cases.append({"adapter": a, "prompt": c["prompt"], "n_prompt": n, "ids": ids, "positions": pos})
    out = {
        "model": golden["model"],
        "weights_dtype": golden["weights_dtype"],
        "decimals": PL_DECIMALS,
        "semantics": (
            "ids = prompt_ids + greedy_ids of the same case in <model>.json; positions[i] (i >= 1) is "
            "the fp32 log_softmax of the logits at position i-1, i.e. the distribution of token i "
            "given ids[:i]: logprob and rank (1 + tokens with a strictly higher logprob) of ids[i], "
            "the top 5 [id, logprob] best first, margin = top1 - top2; positions[0] is null"
        ),
    }
    out["cases"] = cases
    path = os.path.join(FIX, f"{name}.prompt-logprobs.json")
    write_prompt_logprobs_json(path, out)
    n_pos = sum(len(c["ids"]) - 1 for c in cases)
    print(f"{name}: prompt logprobs for {len(cases)} cases, {n_pos} positions, "
          f"{os.path.getsize(path) / 1e3:.0f} kB (teacher-forced vs greedy steps: max |d| {worst_step:.2g})")


# --------------------------------------------------------------------------


def build_fixture(spec, raw_tok, hf_tok, n_vocab, bos_id, eot_id, seed, notes, summary):
    """One model's fixture: the model, its adapters, <name>.json and
    <name>.prompt-logprobs.json.  Returns the last adapter seed used."""
    name = spec["name"]
    model_dir, model = build_model(spec, hf_tok, n_vocab, bos_id, eot_id)
    tok, tokenize, chat = check_tokenizer(raw_tok, hf_tok, model_dir)
    if name == "qwen2-tied":
        qwen_bias_check(model)
    cls_name, auto_len, bad = auto_tokenizer_diff(model_dir, tokenize)
    if auto_len != n_vocab or bad:
        notes.append(
            f"{name}: AutoTokenizer resolves to {cls_name} with {auto_len} tokens "
            f"(tokenizer.json has {n_vocab}); ids differ on {len(bad)} fixture texts {bad!r}"
        )
    out = {
        "model": rel(model_dir),
        "weights_dtype": str(spec["save_dtype"]).replace("torch.", ""),
    }
    if spec.get("phi3_check"):
        out["phi3_checks"] = phi3_check(model_dir, tok)
    if spec.get("multimodal_check"):
        long_ids = tok(BASE_PROMPTS[3], add_special_tokens=True)["input_ids"]
        out["conditional_generation_text_equal"] = multimodal_text_check(model_dir, long_ids)
    if spec.get("softcap_check"):
        long_ids = tok(BASE_PROMPTS[3], add_special_tokens=True)["input_ids"]
        out["softcap_clips"] = softcap_check(model_dir, long_ids)
    if name == "mistral-sharded":
        long_ids = tok(BASE_PROMPTS[3], add_special_tokens=True)["input_ids"] + list(range(100, 120))
        assert len(long_ids) > 2 * spec["config"].sliding_window
        applied = sliding_window_check(model_dir, long_ids)
        out["sliding_window_applied"] = applied
        out["sliding_window_semantics"] = (
            "query at position i attends to key positions j with i - sliding_window < j <= i "
            "(the current token plus the sliding_window - 1 previous ones)"
        )
        if not applied:
            notes.append("mistral-sharded: transformers ignored sliding_window")
    out["tokenize"] = tokenize
    out["chat"] = chat

    cases = run_cases(model, tok, BASE_PROMPTS, None, n_vocab)
    base_by_prompt = {c["prompt"]: c["greedy_ids"] for c in cases}
    adapter_info = []
    for ai, aspec in enumerate(ADAPTERS[name]):
        seed += 1
        adir, pm, ranks, n_mod = build_adapter(name, model_dir, aspec, seed, notes)
        prompts = [BASE_PROMPTS[1 + ai % 3], EXTRA_PROMPTS[(seed + ai) % len(EXTRA_PROMPTS)]]
        acases = run_cases(pm, tok, prompts, rel(adir), n_vocab)
        differs = 0
        for c in acases:
            if c["prompt"] not in base_by_prompt:
                bg, _ = greedy(model, c["prompt_ids"])
                base_by_prompt[c["prompt"]] = bg
            differs += c["greedy_ids"] != base_by_prompt[c["prompt"]]
        adapter_info.append((aspec["name"], n_mod, differs, sorted(set(v[:2] for v in ranks.values()))))
        cases.extend(acases)
    out["cases"] = cases
    write_json(os.path.join(FIX, f"{name}.json"), out)
    record_prompt_logprobs(name)

    margins = [s["margin"] for c in cases for s in c["steps"]]
    summary[name] = {
        "min_margin": min(margins),
        "frac_margin_gt_1e-2": sum(m > 1e-2 for m in margins) / len(margins),
        "adapters": adapter_info,
        "sliding_window_applied": out.get("sliding_window_applied"),
    }
    print(f"{name}: min margin {min(margins):.3g}, "
          f"{summary[name]['frac_margin_gt_1e-2']:.0%} of steps with margin > 1e-2")
    for an, nm, d, ra in adapter_info:
        print(f"    adapter {an}: {nm} LoRA modules, (r, alpha) {ra}, greedy differs from base on {d}/2 prompts")
    return seed


def versions():
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "safetensors": safetensors.__version__,
        "tokenizers": tokenizers.__version__,
        "numpy": numpy.__version__,
    }


def main():
    t0 = time.time()
    vers = versions()
    print("versions:", json.dumps(vers))
    if os.path.exists(FIX):
        shutil.rmtree(FIX)
    os.makedirs(os.path.join(FIX, "models"))
    os.makedirs(os.path.join(FIX, "adapters"))
    write_json(os.path.join(FIX, "versions.json"), vers)

    raw_tok, hf_tok = build_tokenizer()
    n_vocab = len(hf_tok)
    bos_id = raw_tok.token_to_id(BOS)
    eot_id = raw_tok.token_to_id(EOT)
    eot_alt_id = raw_tok.token_to_id("<|end_of_text|>")
    print(f"tokenizer: {n_vocab} tokens (trained {raw_tok.get_vocab_size(with_added_tokens=False)}), "
          f"bos={bos_id} eot={eot_id}; model vocab {pad8(n_vocab)}")
    # Re-training must give the same vocabulary (determinism).
    raw2, _ = build_tokenizer()
    assert raw2.to_str() == raw_tok.to_str(), "tokenizer training is not deterministic"

    notes = []
    summary = {}
    seed = 1000
    for spec in model_specs(n_vocab, bos_id, eot_id, eot_alt_id):
        seed = build_fixture(spec, raw_tok, hf_tok, n_vocab, bos_id, eot_id, seed, notes, summary)
    # The families of issue #16 (also written alone by --families); their adapters' seeds are
    # their own, so adding a family never moves the others' numbers.
    for i, spec in enumerate(family_specs(n_vocab, bos_id, eot_id)):
        build_fixture(spec, raw_tok, hf_tok, n_vocab, bos_id, eot_id, 5000 + 100 * i, notes, summary)

    total = 0
    for root, _, files in os.walk(FIX):
        for fn in files:
            total += os.path.getsize(os.path.join(root, fn))
    print(f"fixtures total: {total / 1e6:.2f} MB")
    assert total < 6 * 1024 * 1024, "fixtures exceed 6 MB"
    for n in notes:
        print("NOTE:", n)
    print(f"done in {time.time() - t0:.1f}s")


def main_prompt_logprobs_only():
    """Record only fixtures/<name>.prompt-logprobs.json from the committed
    models, adapters and cases, leaving every other fixture file untouched (a
    full regeneration on another CPU can move the last digits of the
    committed logprobs, which the fixtures must not)."""
    t0 = time.time()
    vers = versions()
    with open(os.path.join(FIX, "versions.json")) as f:
        recorded = json.load(f)
    if recorded != vers:
        print("NOTE: library versions differ from fixtures/versions.json:", json.dumps(recorded))
    print("versions:", json.dumps(vers))
    names = sorted(
        fn[: -len(".json")]
        for fn in os.listdir(FIX)
        if fn.endswith(".json") and fn != "versions.json" and not fn.endswith(".prompt-logprobs.json")
    )
    for name in names:
        record_prompt_logprobs(name)
    print(f"done in {time.time() - t0:.1f}s")


def main_families(names):
    """Build only the named families' fixtures (FAMILY_SPECS), replacing their
    own model, adapters and reference files and nothing else.  The tokenizer
    is rebuilt and must equal the committed one byte for byte."""
    t0 = time.time()
    vers = versions()
    with open(os.path.join(FIX, "versions.json")) as f:
        recorded = json.load(f)
    if recorded != vers:
        print("NOTE: library versions differ from fixtures/versions.json:", json.dumps(recorded))
    raw_tok, hf_tok = build_tokenizer()
    committed = Tokenizer.from_file(os.path.join(FIX, "models", "llama-gqa", "tokenizer.json"))
    assert committed.to_str() == raw_tok.to_str(), "the rebuilt tokenizer differs from the committed one"
    n_vocab = len(hf_tok)
    bos_id = raw_tok.token_to_id(BOS)
    eot_id = raw_tok.token_to_id(EOT)
    specs = family_specs(n_vocab, bos_id, eot_id)
    known = [sp["name"] for sp in specs]
    for n in names:
        if n not in known:
            sys.exit(f"unknown family fixture {n!r} (known: {', '.join(known)})")
    notes, summary = [], {}
    for i, spec in enumerate(specs):
        name = spec["name"]
        if name not in names:
            continue
        for path in (os.path.join(FIX, "models", name), os.path.join(FIX, "adapters", name)):
            if os.path.exists(path):
                shutil.rmtree(path)
        build_fixture(spec, raw_tok, hf_tok, n_vocab, bos_id, eot_id, 5000 + 100 * i, notes, summary)
        for root, _, files in os.walk(os.path.join(FIX, "models", name)):
            for fn in files:
                size = os.path.getsize(os.path.join(root, fn))
                assert size < 512 * 1024, (fn, size, "keep family fixtures small")
    for n in notes:
        print("NOTE:", n)
    print(f"done in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    if sys.argv[1:] == ["--prompt-logprobs-only"]:
        main_prompt_logprobs_only()
    elif len(sys.argv) == 3 and sys.argv[1] == "--families":
        main_families(sys.argv[2].split(","))
    elif sys.argv[1:]:
        sys.exit(f"usage: {sys.argv[0]} [--prompt-logprobs-only | --families NAME[,NAME...]]")
    else:
        main()
