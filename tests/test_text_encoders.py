"""T5 v1.1 / CLIP text encoders: parity with transformers, FluxPipeline-style encoding, full-size shapes, cache.

Tiny random checkpoints are written with `save_pretrained` (safetensors), every parameter randomly
perturbed so that none of them can be silently ignored. Tokenizers are built offline here.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from pico_jax.model.clip import CLIPTextConfig, abstract_clip_text_encoder, load_clip_text_encoder
from pico_jax.model.t5 import (
    T5Config,
    abstract_t5_encoder,
    load_t5_encoder,
    param_count,
    relative_position_buckets,
)
from pico_jax.model.text import (
    PromptCache,
    TextEncoderLoader,
    TextEncoders,
    cached_encode,
    checkpoint_fingerprint,
    encoder_identity,
    find_tokenizer_dir,
    load_text_encoders,
)
from pico_jax.safetensors_io import CheckpointError


T5_TINY = dict(
    vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4, feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=8, relative_attention_max_distance=16,
)  # small buckets / distance so the logarithmic buckets are exercised at short lengths
CLIP_TINY = dict(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=62, eos_token_id=2, pad_token_id=63,
)
WORDS = (
    "a photo of the cat dog red blue green sky sea tree house on in under big small painting "
    "sketch bright dark old new with and"
).split()
PROMPTS = [
    "a photo of a cat",
    "a big red dog under the blue sky with a small green tree and an old house in the dark sea",
    "painting",
]
LONG_PROMPT = " ".join(WORDS * 4)  # > 77 tokens: truncated by CLIP as well as T5
FP32_TOL = 1e-5  # max |ours - torch| / max |torch|
BF16_TOL = 3e-2


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Randomize every parameter (norm weights away from 1, biases away from 0) so each one matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * noise)
            else:
                p.add_(0.1 * noise)
    return model.eval()


def word_tokenizer(vocab: dict[str, int], template: str, special: list[str], **kw):
    """A whitespace WordLevel tokenizer wrapped for transformers (no hub, no sentencepiece training)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab, unk_token=kw["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[(s, vocab[s]) for s in special])
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kw)


def t5_tokenizer():
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    return word_tokenizer(
        vocab, "$A </s>", ["</s>"], pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def clip_tokenizer():
    # Like CLIP-L's: start/end of text are the two highest ids and padding is end-of-text.
    vocab = {"<|unk|>": 0, **{w: i + 1 for i, w in enumerate(WORDS)}, "<|startoftext|>": 62, "<|endoftext|>": 63}
    return word_tokenizer(
        vocab, "<|startoftext|> $A <|endoftext|>", ["<|startoftext|>", "<|endoftext|>"],
        bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<|unk|>",
        model_max_length=77,
    )


@pytest.fixture(scope="module")
def t5_ckpt(tmp_path_factory):
    """Sharded T5 checkpoint that also carries the tied `encoder.embed_tokens.weight` duplicate; tokenizer inside."""
    from transformers import T5Config as HFT5Config, T5EncoderModel

    torch.manual_seed(0)
    model = perturb(T5EncoderModel(HFT5Config(**T5_TINY)), seed=1)
    d = tmp_path_factory.mktemp("t5")
    model.save_pretrained(d, max_shard_size="20KB")
    index_path = next(d.glob("*.safetensors.index.json"))
    index = json.loads(index_path.read_text())
    assert len(set(index["weight_map"].values())) > 1, "expected a sharded checkpoint"
    shard = index["weight_map"]["shared.weight"]
    tensors = load_file(str(d / shard))
    tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"].copy()
    save_file(tensors, str(d / shard), metadata={"format": "pt"})
    index["weight_map"]["encoder.embed_tokens.weight"] = shard
    index_path.write_text(json.dumps(index))
    t5_tokenizer().save_pretrained(d)
    return d, model


def make_clip(d: Path, seed: int, **overrides):
    from transformers import CLIPTextConfig as HFCLIPConfig, CLIPTextModel

    torch.manual_seed(seed)
    model = perturb(CLIPTextModel(HFCLIPConfig(**{**CLIP_TINY, **overrides})), seed=seed + 1)
    model.save_pretrained(d)
    clip_tokenizer().save_pretrained(d / "tokenizer")  # tokenizer in a subfolder
    return model


@pytest.fixture(scope="module")
def clip_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    return d, make_clip(d, seed=2)


# ------------------------------------------------------------------------------------------ T5


def test_relative_position_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    for n, buckets, dist in ((512, 32, 128), (40, 8, 16)):
        rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]
        want = T5Attention._relative_position_bucket(rel, bidirectional=True, num_buckets=buckets, max_distance=dist)
        np.testing.assert_array_equal(relative_position_buckets(n, n, buckets, dist), want.numpy())


def test_t5_parity_fp32_and_bf16(t5_ckpt):
    d, ref_model = t5_ckpt
    rng = np.random.default_rng(0)
    ids = rng.integers(0, T5_TINY["vocab_size"], size=(3, 24))
    mask = np.ones_like(ids)
    mask[1, 15:] = 0  # padded rows
    mask[2, 4:] = 0
    with torch.no_grad():
        ref_masked = ref_model(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
        ref_plain = ref_model(torch.tensor(ids)).last_hidden_state.numpy()

    ours = load_t5_encoder(d, dtype=jnp.float32)
    e_masked = rel_err(ours(jnp.asarray(ids), jnp.asarray(mask)), ref_masked)
    e_plain = rel_err(ours(jnp.asarray(ids)), ref_plain)
    print(f"T5 fp32 rel err: masked {e_masked:.2e}, no mask {e_plain:.2e}")
    assert e_masked < FP32_TOL and e_plain < FP32_TOL
    # padding must change the valid positions' outputs (the mask is really applied) ...
    assert rel_err(ref_masked[1, :15], ref_plain[1, :15]) > 1e-3

    ours16 = load_t5_encoder(d, dtype=jnp.bfloat16)
    assert ours16.blocks.attn.q.kernel.dtype == jnp.bfloat16
    out16 = ours16(jnp.asarray(ids), jnp.asarray(mask))
    assert out16.dtype == jnp.bfloat16
    e16 = rel_err(out16, ref_masked)
    with torch.no_grad():  # what bf16 costs transformers itself, for scale
        torch16 = copy.deepcopy(ref_model).to(torch.bfloat16)
        out_torch16 = torch16(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
        e_torch16 = rel_err(out_torch16.float(), ref_masked)
    print(f"T5 bf16 rel err: ours {e16:.2e}, transformers bf16 {e_torch16:.2e}")
    assert e16 < BF16_TOL and e16 < 2 * e_torch16


# ------------------------------------------------------------------------------------------ CLIP


@pytest.mark.parametrize("eos_mode", ["argmax", "first_eos"])
def test_clip_parity_fp32_and_bf16(tmp_path, clip_ckpt, eos_mode):
    if eos_mode == "argmax":  # legacy eos_token_id == 2 (FLUX's config): pooled at argmax(ids)
        d, ref_model = clip_ckpt
    else:  # first occurrence of eos_token_id; padding uses a different, higher id here
        d, ref_model = tmp_path, make_clip(tmp_path, seed=5, eos_token_id=40)
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 40, size=(3, 77))
    for row, end in enumerate((10, 77 - 1, 30)):
        ids[row, end] = 63 if eos_mode == "argmax" else 40
        ids[row, end + 1 :] = 63  # padding
    ids[0, 3] = 40 if eos_mode == "first_eos" else ids[0, 3]  # an early eos wins in first_eos mode
    mask = np.ones_like(ids)
    mask[0, 20:] = 0
    with torch.no_grad():
        ref = ref_model(torch.tensor(ids))
        ref_m = ref_model(torch.tensor(ids), attention_mask=torch.tensor(mask))

    # the padding mask really changes row 0 beyond position 20 (before it, causality already hides it)
    assert rel_err(ref_m.last_hidden_state[0, 20:], ref.last_hidden_state[0, 20:]) > 1e-3

    ours = load_clip_text_encoder(d, dtype=jnp.float32)
    h, pooled = ours(jnp.asarray(ids))
    hm, pooled_m = ours(jnp.asarray(ids), jnp.asarray(mask))
    errs = [
        rel_err(h, ref.last_hidden_state), rel_err(pooled, ref.pooler_output),
        rel_err(hm, ref_m.last_hidden_state), rel_err(pooled_m, ref_m.pooler_output),
    ]
    print(f"CLIP ({eos_mode}) fp32 rel errs (hidden, pooled, masked hidden, masked pooled): {errs}")
    assert max(errs) < FP32_TOL

    ours16 = load_clip_text_encoder(d, dtype=jnp.bfloat16)
    h16, pooled16 = ours16(jnp.asarray(ids))
    assert pooled16.dtype == jnp.bfloat16
    e16 = max(rel_err(h16, ref.last_hidden_state), rel_err(pooled16, ref.pooler_output))
    with torch.no_grad():  # what bf16 costs transformers itself, for scale
        ref16 = copy.deepcopy(ref_model).to(torch.bfloat16)(torch.tensor(ids))
    e_torch16 = max(rel_err(ref16.last_hidden_state.float(), ref.last_hidden_state),
                    rel_err(ref16.pooler_output.float(), ref.pooler_output))
    print(f"CLIP ({eos_mode}) bf16 rel err: ours {e16:.2e}, transformers bf16 {e_torch16:.2e}")
    assert e16 < BF16_TOL and e16 < 2 * e_torch16


def test_clip_loads_transformers4_key_layout(tmp_path, clip_ckpt):
    """FLUX's text_encoder was saved by transformers 4.x: `text_model.` prefix, persisted position_ids."""
    d, _ = clip_ckpt
    tensors = {f"text_model.{k}": v for k, v in load_file(str(d / "model.safetensors")).items()}
    tensors["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    tensors["text_projection.weight"] = np.zeros((4, 32), np.float32)  # a WithProjection head is ignored
    save_file(tensors, str(tmp_path / "model.safetensors"))
    shutil.copy(d / "config.json", tmp_path / "config.json")
    a, b = load_clip_text_encoder(d), load_clip_text_encoder(tmp_path)
    for (pa, va), (pb, vb) in zip(nnx.to_flat_state(nnx.state(a)), nnx.to_flat_state(nnx.state(b))):
        assert pa == pb
        np.testing.assert_array_equal(np.asarray(va[...]), np.asarray(vb[...]))


# ------------------------------------------------------------------------------------------ end to end


class FluxTextReference:
    """diffusers' own FluxPipeline prompt-encoding methods, bound to just the text components."""

    def __init__(self, tokenizer, text_encoder, tokenizer_2, text_encoder_2):
        from diffusers import FluxPipeline

        cls = type(self)
        cls.encode_prompt = FluxPipeline.encode_prompt
        cls._get_t5_prompt_embeds = FluxPipeline._get_t5_prompt_embeds
        cls._get_clip_prompt_embeds = FluxPipeline._get_clip_prompt_embeds
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.tokenizer_2, self.text_encoder_2 = tokenizer_2, text_encoder_2
        self.tokenizer_max_length = tokenizer.model_max_length
        self._execution_device = torch.device("cpu")


def test_load_text_encoders_matches_flux_pipeline(t5_ckpt, clip_ckpt):
    (t5_dir, t5_ref), (clip_dir, clip_ref) = t5_ckpt, clip_ckpt
    prompts = PROMPTS + [LONG_PROMPT]
    max_len = 16  # shorter than prompt 2 and the long prompt: exercises truncation and padding
    ref = FluxTextReference(clip_tokenizer(), clip_ref, t5_tokenizer(), t5_ref)
    with torch.no_grad():
        ref_embeds, ref_pooled, ref_ids = ref.encode_prompt(prompts, max_sequence_length=max_len)

    enc = load_text_encoders(t5_dir, clip_dir, dtype=jnp.float32, t5_max_length=max_len)
    t5_ids, clip_ids = enc.tokenize(prompts)
    assert t5_ids.shape == (4, max_len) and clip_ids.shape == (4, 77)
    out = enc.encode(prompts)
    assert out.prompt_embeds.shape == (4, max_len, T5_TINY["d_model"])
    assert out.pooled_prompt_embeds.shape == (4, CLIP_TINY["hidden_size"])
    np.testing.assert_array_equal(np.asarray(out.text_ids), ref_ids.numpy())
    e_embeds, e_pooled = rel_err(out.prompt_embeds, ref_embeds), rel_err(out.pooled_prompt_embeds, ref_pooled)
    print(f"FluxPipeline-style fp32 rel err: prompt_embeds {e_embeds:.2e}, pooled {e_pooled:.2e}")
    assert e_embeds < FP32_TOL and e_pooled < FP32_TOL

    enc16 = load_text_encoders(t5_dir, clip_dir, dtype=jnp.bfloat16, t5_max_length=max_len)
    out16 = enc16.encode(prompts)
    assert out16.prompt_embeds.dtype == jnp.bfloat16
    e16 = max(rel_err(out16.prompt_embeds, ref_embeds), rel_err(out16.pooled_prompt_embeds, ref_pooled))
    print(f"FluxPipeline-style bf16 rel err: {e16:.2e}")
    assert e16 < BF16_TOL


def test_text_encoders_sharded_over_a_mesh_match_unsharded(t5_ckpt, clip_ckpt):
    """load_text_encoders(mesh=...) puts each parameter on its shards (FSDP over d_model, tensor
    parallel over the MLP / head width) and encode() returns the unsharded values, replicated."""
    from jax.sharding import PartitionSpec as P

    from pico_jax.parallel import make_mesh

    (t5_dir, _), (clip_dir, _) = t5_ckpt, clip_ckpt
    mesh = make_mesh("fsdp=4,tensor=2", jax.devices()[:8])
    plain = load_text_encoders(t5_dir, clip_dir, dtype=jnp.float32, t5_max_length=16)
    sharded = load_text_encoders(t5_dir, clip_dir, dtype=jnp.float32, t5_max_length=16, mesh=mesh)

    def spec(param) -> P:
        return param[...].sharding.spec

    t5, clip = sharded.t5, sharded.clip
    assert spec(t5.blocks.attn.q.kernel) == P(None, "fsdp", "tensor")  # (layers, d_model, inner)
    assert spec(t5.blocks.attn.o.kernel) == P(None, "tensor", "fsdp")  # the down projections
    assert spec(t5.blocks.ffn.wo.kernel) == P(None, "tensor", "fsdp")
    assert spec(t5.token_embedding.embedding) == P("tensor", "fsdp")  # (vocab, d_model)
    assert spec(clip.blocks.attn.out.kernel) == P(None, "tensor", "fsdp")
    assert spec(clip.blocks.mlp.fc1.kernel) == P(None, "fsdp", "tensor")
    # each device really holds an eighth of a kernel (layers, 32 / 4, 48 / 2)
    shards = t5.blocks.ffn.wi_0.kernel[...].addressable_shards
    assert len(shards) == 8 and {sh.data.shape for sh in shards} == {(T5_TINY["num_layers"], 8, 24)}

    # 3 prompts run whole on every device; 4 split over the mesh's data x fsdp = 4 devices.
    for prompts in (PROMPTS, PROMPTS + ["a fourth prompt"]):
        want, got = plain.encode(prompts), sharded.encode(prompts)
        for name in ("prompt_embeds", "pooled_prompt_embeds"):
            a, b = getattr(got, name), getattr(want, name)
            assert a.sharding.is_fully_replicated and len(a.sharding.device_set) == 8, name
            assert rel_err(a, b) < 1e-6, name  # the same sums, split across devices


@pytest.mark.parametrize("encoder", ["t5", "clip"])
def test_encoders_on_fsdp_gather_only_their_layers_weights(encoder):
    """On fsdp=8, a batch the mesh divides moves each layer's weights once and the activations
    hardly at all. The embedding table is split over 'fsdp' along its width; before
    `parallel.split_by_batch` its looked-up tokens stayed split by width through every layer and
    were all-gathered at each norm (T5-XXL: 11.7 GiB a call against 8.6 GiB of layer weights); now
    they are re-laid out by batch once, an all-to-all of each device's share."""
    from pico_jax.model.text import _run_clip_pooled, _run_t5
    from pico_jax.parallel import batch_sharding, collective_bytes, make_mesh, replicated, state_shardings

    mesh = make_mesh("fsdp=8", jax.devices()[:8])
    if encoder == "t5":
        model, run, length = abstract_t5_encoder(T5Config(vocab_size=512, d_model=512, d_ff=1024, num_layers=4,
                                                          num_heads=8), dtype=jnp.bfloat16), _run_t5, 256
    else:
        model, run, length = abstract_clip_text_encoder(CLIPTextConfig(vocab_size=512, hidden_size=512,
                                                                       intermediate_size=1024, num_hidden_layers=4,
                                                                       num_attention_heads=8),
                                                        dtype=jnp.bfloat16), _run_clip_pooled, 77
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                         state, state_shardings(state, mesh))
    ids = jax.ShapeDtypeStruct((8, length), jnp.int32, sharding=batch_sharding(mesh, 2))
    with jax.set_mesh(mesh):
        moved = collective_bytes(run.lower(graphdef, state, ids, replicated(mesh)).compile().as_text())
    layers = sum(leaf.size * leaf.dtype.itemsize for path, leaf in jax.tree.leaves_with_path(state)
                 if "blocks" in jax.tree_util.keystr(path) and "fsdp" in leaf.sharding.spec)  # norms, biases: whole
    output = 8 * length * (512 + 1) * 4  # the replicated result, gathered once (fp32 at most), and the ids
    # split_by_batch's re-layout of the embedded tokens, width-split to batch-split: one all-to-all of
    # a device's share (fp32 at most: XLA:CPU widens bf16 collectives).
    relaid = 8 * length * 512 * 4 // 8
    assert layers <= moved.get("all-gather", 0) <= layers + output, (moved, layers)
    assert moved.get("all-to-all", 0) <= relaid, moved
    assert sum(moved.values()) <= 1.01 * (layers + output) + relaid, moved


def test_bf16_text_encoders_convert_no_weight_stack_to_fp32():
    """On CPU the encoders' bf16 layers run through FLUX's scan and Dense, so XLA converts no weight
    stack to fp32 on each call (nnx.Linear and a plain scan did: 0.53x transformers' bf16 T5)."""
    import re

    from pico_jax.model.clip import CLIPTextEncoder
    from pico_jax.model.t5 import T5Encoder

    if jax.default_backend() != "cpu":
        pytest.skip("the fp32 upcast is XLA:CPU's")
    ids = jnp.zeros((1, 16), jnp.int32)
    for model in (T5Encoder(T5Config.from_hf(T5_TINY), dtype=jnp.bfloat16, rngs=nnx.Rngs(0)),
                  CLIPTextEncoder(CLIPTextConfig.from_hf(CLIP_TINY), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))):
        graphdef, state = nnx.split(model)
        hlo = jax.jit(lambda s, i: nnx.merge(graphdef, s)(i)).lower(state, ids).compile().as_text()
        stacks = {leaf.shape for path, leaf in jax.tree.leaves_with_path(state)
                  if "blocks" in jax.tree_util.keystr(path) and leaf.ndim == 3}
        assert stacks, type(model).__name__
        for shape in stacks:
            assert not re.search(rf"= f32\[{','.join(map(str, shape))}\]", hlo), (type(model).__name__, shape)


# ------------------------------------------------------------------------------------------ full size

T5_XXL_PARAMS = 4_762_310_656  # T5 v1.1 XXL encoder incl. the 32128 x 4096 embedding
CLIP_L_TEXT_PARAMS = 123_060_480  # CLIP ViT-L/14 text transformer (no projection)


def test_full_size_shapes_and_param_counts():
    from transformers import CLIPTextConfig as HFCLIPConfig, CLIPTextModel, T5Config as HFT5Config, T5EncoderModel

    # Configs as FLUX.1's text_encoder_2 / text_encoder config.json write them.
    t5_hf = dict(
        vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
    )
    clip_hf = dict(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", eos_token_id=2,
    )
    t5_cfg, clip_cfg = T5Config.from_hf(t5_hf), CLIPTextConfig.from_hf(clip_hf)
    assert t5_cfg == T5Config() and clip_cfg == CLIPTextConfig()  # defaults are the FLUX encoders

    with torch.device("meta"):
        want_t5 = sum(p.numel() for p in T5EncoderModel(HFT5Config(**t5_hf)).parameters())
        want_clip = sum(p.numel() for p in CLIPTextModel(HFCLIPConfig(**clip_hf)).parameters())
    assert want_t5 == T5_XXL_PARAMS and want_clip == CLIP_L_TEXT_PARAMS

    t0 = time.perf_counter()
    t5 = abstract_t5_encoder(t5_cfg, dtype=jnp.bfloat16)
    clip = abstract_clip_text_encoder(clip_cfg, dtype=jnp.bfloat16)
    assert param_count(t5) == T5_XXL_PARAMS
    assert param_count(clip) == CLIP_L_TEXT_PARAMS
    assert t5.blocks.ffn.wi_0.kernel.shape == (24, 4096, 10240)

    # The forward passes trace (scan over the stacked layers) without allocating anything.
    g5, s5 = nnx.split(t5)
    out = jax.eval_shape(lambda s, x: nnx.merge(g5, s)(x), s5, jax.ShapeDtypeStruct((2, 512), jnp.int32))
    assert out.shape == (2, 512, 4096) and out.dtype == jnp.bfloat16
    gc, sc = nnx.split(clip)
    h, pooled = jax.eval_shape(lambda s, x: nnx.merge(gc, s)(x), sc, jax.ShapeDtypeStruct((2, 77), jnp.int32))
    assert h.shape == (2, 77, 768) and pooled.shape == (2, 768)
    elapsed = time.perf_counter() - t0
    print(f"full-size abstract build + trace: {elapsed:.1f}s; T5 {param_count(t5):,} CLIP {param_count(clip):,}")
    assert elapsed < 30


# ------------------------------------------------------------------------------------------ cache


class CountingLoader:
    """Wraps a TextEncoderLoader, counting loads and recording which prompts get encoded."""

    def __init__(self, inner: TextEncoderLoader):
        self.inner, self.loads, self.encoded = inner, 0, []
        self.identity, self.t5_max_length = inner.identity, inner.t5_max_length

    def __call__(self) -> TextEncoders:
        self.loads += 1
        enc = self.inner()
        real = enc.encode

        def encode(prompts):
            self.encoded.extend(prompts)
            return real(prompts)

        enc.encode = encode
        return enc


def test_prompt_cache(tmp_path, t5_ckpt, clip_ckpt):
    (t5_dir, _), (clip_dir, _) = t5_ckpt, clip_ckpt
    cache = PromptCache(tmp_path / "cache")
    loader = CountingLoader(TextEncoderLoader(t5_dir, clip_dir, dtype=jnp.float32, t5_max_length=16))

    first = cached_encode(PROMPTS[:2], loader, cache)
    assert loader.loads == 1 and loader.encoded == PROMPTS[:2]
    second = cached_encode(list(reversed(PROMPTS[:2])), loader, cache)  # all hits: nothing loaded
    assert loader.loads == 1
    np.testing.assert_array_equal(np.asarray(second.prompt_embeds[::-1]), np.asarray(first.prompt_embeds))
    np.testing.assert_array_equal(np.asarray(second.pooled_prompt_embeds[::-1]), np.asarray(first.pooled_prompt_embeds))
    assert second.text_ids.shape == (16, 3)

    # A partial hit encodes only the new prompt (once, though it is asked for twice).
    third = cached_encode([PROMPTS[0], PROMPTS[2], PROMPTS[2]], loader, cache)
    assert loader.loads == 2 and loader.encoded == PROMPTS[:2] + [PROMPTS[2]]
    direct = loader.inner().encode([PROMPTS[0], PROMPTS[2]])
    np.testing.assert_allclose(np.asarray(third.prompt_embeds[:2]), np.asarray(direct.prompt_embeds), atol=1e-6)

    # An already-loaded TextEncoders works too and hits the same entries.
    hit = cached_encode(PROMPTS, direct_enc := loader.inner(), cache)
    assert direct_enc.identity == loader.identity
    np.testing.assert_array_equal(np.asarray(hit.prompt_embeds[:2]), np.asarray(first.prompt_embeds))

    # Different max length or encoder identity -> different entries.
    p, ident = PROMPTS[0], loader.identity
    assert cache.entry_path(p, ident, 16) != cache.entry_path(p, ident, 8)
    assert cache.entry_path(p, ident, 16) != cache.entry_path(p, "other-encoder", 16)
    assert cache.get(p, ident, 8) is None and cache.get(p, "other-encoder", 16) is None
    short = CountingLoader(TextEncoderLoader(t5_dir, clip_dir, dtype=jnp.float32, t5_max_length=8))
    assert short.identity == ident  # same checkpoints; max length is its own key part
    assert cached_encode([p], short, cache).prompt_embeds.shape == (1, 8, T5_TINY["d_model"])
    assert short.loads == 1
    assert encoder_identity(t5_dir, clip_dir, jnp.bfloat16) != ident  # dtype is part of the identity

    # A plain callable needs identity / max length spelled out.
    with pytest.raises(ValueError, match="identity"):
        cached_encode([p], lambda: loader.inner(), cache)
    assert len(cached_encode([p], lambda: 1 / 0, cache, identity=ident, max_length=16).prompt_embeds) == 1

    # Atomic writes leave no temporaries; a corrupted entry is a miss, rewritten on the next encode.
    files = sorted((tmp_path / "cache").iterdir())
    assert all(f.suffix == ".safetensors" and not f.name.startswith(".") for f in files)
    cache.entry_path(p, ident, 16).write_bytes(b"garbage")
    assert cache.get(p, ident, 16) is None
    cached_encode([p], loader, cache)
    assert cache.get(p, ident, 16) is not None


def test_checkpoint_fingerprint_distinguishes_weights(tmp_path, clip_ckpt):
    d, _ = clip_ckpt
    other = tmp_path / "clip"
    shutil.copytree(d, other)
    assert checkpoint_fingerprint(other) == checkpoint_fingerprint(d)
    tensors = load_file(str(other / "model.safetensors"))
    key = "encoder.layers.0.mlp.fc1.weight"
    tensors[key] = tensors[key] + 1.0  # same names, shapes and file size: a "fine-tune"
    save_file(tensors, str(other / "model.safetensors"), metadata={"format": "pt"})
    assert checkpoint_fingerprint(other) != checkpoint_fingerprint(d)


# ------------------------------------------------------------------------------------------ errors


def test_missing_tokenizer_error(tmp_path, t5_ckpt, clip_ckpt):
    (t5_dir, _), (clip_dir, _) = t5_ckpt, clip_ckpt
    bare = tmp_path / "t5_no_tokenizer"
    bare.mkdir()
    for f in t5_dir.iterdir():
        if "safetensors" in f.name or f.name == "config.json":
            shutil.copy(f, bare / f.name)
    with pytest.raises(CheckpointError, match="no tokenizer found") as e:
        load_text_encoders(bare, clip_dir)
    assert str(bare) in str(e.value)


def test_tokenizer_in_diffusers_sibling_folder(tmp_path, t5_ckpt):
    """FLUX repo layout: text_encoder_2/ holds weights, tokenizer_2/ beside it holds the tokenizer."""
    t5_dir, _ = t5_ckpt
    (tmp_path / "text_encoder_2").mkdir()
    t5_tokenizer().save_pretrained(tmp_path / "tokenizer_2")
    assert find_tokenizer_dir(tmp_path / "text_encoder_2") == tmp_path / "tokenizer_2"
    assert find_tokenizer_dir(t5_dir) == t5_dir


def test_mismatched_checkpoint_errors(tmp_path, t5_ckpt, clip_ckpt):
    (t5_dir, _), (clip_dir, _) = t5_ckpt, clip_ckpt

    missing = tmp_path / "missing"
    shutil.copytree(clip_dir, missing)
    tensors = load_file(str(missing / "model.safetensors"))
    del tensors["encoder.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, str(missing / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\).*layers\.1\.self_attn\.k_proj\.bias") as e:
        load_clip_text_encoder(missing)
    assert str(missing) in str(e.value)

    wrong = tmp_path / "wrong_shape"
    shutil.copytree(t5_dir, wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["d_ff"] = 40
    (wrong / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"wi_0\.weight.*\(48, 32\).*\(40, 32\)") as e:
        load_t5_encoder(wrong)
    assert str(wrong) in str(e.value)

    garbage = tmp_path / "garbage"
    shutil.copytree(clip_dir, garbage)
    (garbage / "model.safetensors").write_bytes(b"this is not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file") as e:
        load_clip_text_encoder(garbage)
    assert str(garbage) in str(e.value)

    nonconfig = tmp_path / "no_config"
    shutil.copytree(clip_dir, nonconfig)
    (nonconfig / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_clip_text_encoder(nonconfig)

    with pytest.raises(ValueError, match="gated"):
        T5Config.from_hf({**T5_TINY, "feed_forward_proj": "relu"})
