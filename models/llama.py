"""One Flax NNX decoder for the Llama family: Llama 2/3/3.1, Mistral, Qwen2 (qkv bias) and
Qwen3 (q/k RMSNorm), chosen by `ModelConfig`.

Attribute names follow Hugging Face's module names, so a checkpoint tensor
`model.layers.3.self_attn.o_proj.weight` lands on `model.layers[3].self_attn.o_proj.kernel`,
except that q/k/v and gate/up are fused: one [D, (N + 2K) H] and one [D, 2F] matmul instead of
five, so a decode step launches fewer, larger kernels that stream the weights closer to HBM
bandwidth. gate_up_proj keeps gate and up interleaved in column blocks, and q/k heads keep
RoPE's rotated pairs side by side (models/layout.py, pallas_kernels/rope.py), so that a kernel
can fuse the activation, RoPE and the KV cache write into the matmul. Linear
kernels are stored [in, out] (transposed from torch): `x @ kernel`. Layers are a Python list,
unrolled in the trace: on GPU, XLA streams unrolled per-layer weights at ~92% of HBM bandwidth
against ~33% under `lax.scan` (DESIGN.md, "The fast path").
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig, RopeScaling
from pallas_kernels import decode_matmul, gate_up
from pallas_kernels.attention import AttentionBackend, AttentionMetadata, paged_attention
from pallas_kernels.rope import apply_rope


def _init(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: jnp.dtype, std: float = 0.02):
    return nnx.Param(jax.random.normal(rngs.params(), shape, jnp.float32).astype(dtype) * std)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel: [in, out]. With `reduce_axis` (a tensor-parallel
    model's row-split o_proj and down_proj), x @ kernel is one shard's partial sum: it is
    summed over the axis's shards before the bias is added, once."""

    def __init__(self, d_in: int, d_out: int, *, bias: bool, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.kernel = _init(rngs, (d_in, d_out), dtype)
        self.bias = nnx.Param(jnp.zeros((d_out,), dtype)) if bias else None

    def __call__(self, x: jax.Array, reduce_axis: str | None = None) -> jax.Array:
        y = _reduce(x @ self.kernel[...], reduce_axis)
        return y if self.bias is None else y + self.bias[...]


class RMSNorm(nnx.Module):
    """HF's LlamaRMSNorm: normalise in float32, cast back, then scale."""

    def __init__(self, dim: int, *, eps: float, dtype: jnp.dtype):
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * x32.astype(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> jnp.ndarray:
    """Inverse frequencies [H / 2], with `linear` or `llama3` scaling applied."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
        old_len = scaling.original_max_position_embeddings
        low_wavelen = old_len / scaling.low_freq_factor
        high_wavelen = old_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
        inv_freq = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(mid, blended, inv_freq)
    return inv_freq


class Attention(nnx.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        *,
        dtype: jnp.dtype,
        backend: AttentionBackend,
        rngs: nnx.Rngs,
        shard_axis: str | None = None,
    ):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.qkv_proj = Linear(d, (n + 2 * k) * h, bias=bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(n * h, d, bias=cfg.o_proj_bias, dtype=dtype, rngs=rngs)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(h, eps=cfg.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(h, eps=cfg.rms_norm_eps, dtype=dtype)
        else:
            self.q_norm = self.k_norm = None
        self.num_heads, self.num_kv_heads, self.head_dim = n, k, h
        self.sliding_window = cfg.sliding_window
        self.backend = backend
        self.shard_axis = shard_axis

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        inv_freq: jax.Array,
        kv_cache: jax.Array,
        meta: AttentionMetadata,
    ) -> tuple[jax.Array, jax.Array]:
        """x: [T, D] -> ([T, D], updated kv_cache)."""
        out, kv_cache = self.attend(self.qkv_proj(x), positions, inv_freq, kv_cache, meta)
        return self.o_proj(out, self.shard_axis), kv_cache

    def attend(
        self,
        qkv: jax.Array,
        positions: jax.Array,
        inv_freq: jax.Array,
        kv_cache: jax.Array,
        meta: AttentionMetadata,
    ) -> tuple[jax.Array, jax.Array]:
        """The fused projection [T, (N + 2K) H] -> the attention's output [T, N H] (before
        o_proj), updated kv_cache."""
        t = qkv.shape[0]
        n, k, h = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = jnp.split(qkv, [n * h, (n + k) * h], axis=-1)
        q = q.reshape(t, n, h)
        k = k.reshape(t, self.num_kv_heads, h)
        v = v.reshape(t, self.num_kv_heads, h)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
        return self.attend_roped(q, k, v, kv_cache, meta)

    def attend_roped(
        self,
        q: jax.Array,
        k: jax.Array | None,
        v: jax.Array | None,
        kv_cache: jax.Array,
        meta: AttentionMetadata,
    ) -> tuple[jax.Array, jax.Array]:
        """q [T, N, H] and k [T, K, H] after RoPE, v [T, K, H] (k = v = None: already in the
        cache, as a fused decode layer's qkv writes them) -> the attention's output [T, N H]
        (before o_proj), updated kv_cache."""
        out, kv_cache = paged_attention(
            q,
            k,
            v,
            kv_cache,
            meta,
            sm_scale=self.head_dim**-0.5,
            sliding_window=self.sliding_window,
            backend=self.backend,
        )
        return out.reshape(q.shape[0], -1), kv_cache


def _reduce(x: jax.Array, axis: str | None) -> jax.Array:
    """The sum over the shards of `axis` of their partial outputs (x itself unsharded)."""
    return x if axis is None else jax.lax.psum(x, axis)


class MLP(nnx.Module):
    """down_proj(silu(gate) * up), gate_up_proj's columns interleaved (`layout.arrange_param`)."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        dtype: jnp.dtype,
        backend: AttentionBackend,
        rngs: nnx.Rngs,
        shard_axis: str | None = None,
    ):
        d, f, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_up_proj = Linear(d, 2 * f, bias=bias, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(f, d, bias=bias, dtype=dtype, rngs=rngs)
        self.block = gate_up.block_for(f)
        self.use_kernels = backend is AttentionBackend.PALLAS
        self.shard_axis = shard_axis

    def __call__(self, x: jax.Array) -> jax.Array:
        proj = self.gate_up_proj
        bias = None if proj.bias is None else proj.bias[...]
        h = gate_up.silu_gate_up(
            x, proj.kernel[...], bias, block=self.block, use_kernels=self.use_kernels
        )
        return self.down_proj(h, self.shard_axis)


class DecoderLayer(nnx.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        *,
        dtype: jnp.dtype,
        backend: AttentionBackend,
        rngs: nnx.Rngs,
        shard_axis: str | None = None,
    ):
        kw = dict(dtype=dtype, backend=backend, rngs=rngs, shard_axis=shard_axis)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(cfg, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.mlp = MLP(cfg, **kw)
        self.fused_shapes = decode_matmul.layer_shapes(cfg, dtype)  # None: never fused

    def fused_mode(self, num_tokens: int) -> str | None:
        """How a step of `num_tokens` runs this layer: "gpu" / "interpret" (`fused`), or None
        (`__call__`, XLA's fusions; pallas_kernels/decode_matmul.py)."""
        dtype = self.self_attn.qkv_proj.kernel.dtype
        return decode_matmul.layer_mode(
            self.self_attn.backend, num_tokens, self.fused_shapes, dtype
        )

    def __call__(self, x, positions, inv_freq, kv_cache, meta):
        h, kv_cache = self.self_attn(self.input_layernorm(x), positions, inv_freq, kv_cache, meta)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), kv_cache

    def fused(
        self,
        x: jax.Array,
        norm_in: tuple[jax.Array, jax.Array],
        next_norm: jax.Array,
        positions: jax.Array,
        inv_freq: jax.Array,
        kv_cache: jax.Array,
        meta: AttentionMetadata,
    ) -> tuple[tuple[jax.Array, tuple[jax.Array, jax.Array]], jax.Array]:
        """The same layer with three of its matmuls fused with their neighbours
        (pallas_kernels/gpu_decode_matmul.py): the input norm split between the previous
        layer and qkv; RoPE and the KV cache write in qkv's epilogue (where the heads allow:
        `decode_matmul.qkv_columns`); o_proj's residual add making the post-attention norm's
        inputs; that norm and silu * up inside gate/up. down_proj stays with XLA (its residual
        add fused into the sum of its split-K partials, or at 64 tokens into cuBLAS'
        epilogue), and so do the next layer's norm inputs. In a tensor-parallel model
        (`shard_axis`) o_proj's output is one shard's partial sum: it is summed across the
        shards before the residual add, which then stays with XLA. `norm_in`: this layer's
        input norm's inputs (`decode_matmul.norm_inputs(x, input_layernorm weight)`); `next_norm`:
        the next layer's input norm's weight (the model's final norm's for the last). Returns
        (x, the next norm's inputs) and the cache."""
        attn, mlp = self.self_attn, self.mlp
        mm = functools.partial(decode_matmul.matmul, mode=self.fused_mode(x.shape[0]))
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        xw, sq = norm_in
        heads = self.fused_shapes[0].qkv  # None: RoPE and the cache write stay with XLA
        if heads is None:
            qkv = mm(xw, attn.qkv_proj.kernel[...], row_sq=sq, eps=norm1.eps)
            out, kv_cache = attn.attend(qkv, positions, inv_freq, kv_cache, meta)
        else:
            q, kv_cache = mm(
                xw,
                attn.qkv_proj.kernel[...],
                row_sq=sq,
                eps=norm1.eps,
                qkv=heads,
                positions=positions,
                inv_freq=inv_freq,
                kv_cache=kv_cache,
                slot_ids=meta.slot_ids,
            )
            q = q.reshape(q.shape[0], -1, attn.head_dim)
            out, kv_cache = attn.attend_roped(q, None, None, kv_cache, meta)
        if attn.shard_axis is None:
            o_proj = attn.o_proj.kernel[...]
            x, xw, sq = mm(out, o_proj, residual=x, next_norm_weight=norm2.scale[...])
        else:
            x = x + _reduce(mm(out, attn.o_proj.kernel[...]), attn.shard_axis)
            xw, sq = decode_matmul.norm_inputs(x, norm2.scale[...])
        h = mm(xw, mlp.gate_up_proj.kernel[...], row_sq=sq, eps=norm2.eps, gate_up_block=mlp.block)
        x = x + mlp.down_proj(h, mlp.shard_axis)
        xw, sq = decode_matmul.norm_inputs(x, next_norm)
        return (x, (xw, sq)), kv_cache


# Logical axes of the parameters a tensor-parallel model splits (sharding.RULES); a fused
# parameter's columns are grouped by shard (`layout.arrange_param`). o_proj's and down_proj's biases
# are whole (`Linear`'s reduce_axis).
_PARAM_AXES = {
    ("qkv_proj", "kernel"): ("embed", "heads"),
    ("qkv_proj", "bias"): ("heads",),
    ("o_proj", "kernel"): ("heads", "embed"),
    ("gate_up_proj", "kernel"): ("embed", "mlp"),
    ("gate_up_proj", "bias"): ("mlp",),
    ("down_proj", "kernel"): ("mlp", "embed"),
    ("lm_head", "kernel"): ("embed", "vocab"),
}


@functools.partial(jax.jit, static_argnames=("graphdef", "method"))
def _layer_call(graphdef, state, *args, method: str = "__call__"):
    """One decoder layer (`method` of it) as a jitted function of its weights. Every layer has
    the same graph and shapes, so the layer is traced and lowered once per step shape instead
    of once per layer (start-up time: tracing the unrolled 32 layers dominated a warm start).
    XLA inlines the calls before optimising, so the compiled step is the same unrolled
    program."""
    return getattr(nnx.merge(graphdef, state), method)(*args)


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.embedding = _init(rngs, (vocab, dim), dtype)

    def __call__(self, token_ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], token_ids, axis=0)


class LlamaModel(nnx.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        *,
        dtype: jnp.dtype,
        backend: AttentionBackend,
        rngs: nnx.Rngs,
        shard_axis: str | None = None,
    ):
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List(
            [
                DecoderLayer(cfg, dtype=dtype, backend=backend, rngs=rngs, shard_axis=shard_axis)
                for _ in range(cfg.num_layers)
            ]
        )
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)


class LlamaForCausalLM(nnx.Module):
    """The decoder plus LM head. Forward: tokens -> final hidden states; `logits` separately,
    so only the rows that are sampled pay for the [D, V] head.

    `num_shards` > 1 builds one shard of a tensor-parallel model, to run under `shard_map`
    over the mesh axis `shard_axis` (sharding/): its layers have `cfg.shard(num_shards)`'s
    heads and MLP width, and sum o_proj's and down_proj's outputs across the axis; its LM head
    has 1/n of the vocabulary where n divides it, and gathers the logits. The embedding and
    the norms are whole on every shard. `config` stays the whole model's; `param_axes` names
    each parameter's axes for the mesh."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        dtype: jnp.dtype = jnp.float32,
        attention_backend: AttentionBackend = AttentionBackend.REFERENCE,
        rngs: nnx.Rngs,
        num_shards: int = 1,
        shard_axis: str | None = None,
    ):
        if (num_shards > 1) != (shard_axis is not None):
            raise ValueError("a sharded model needs a mesh axis (shard_axis), and only it")
        self.config = cfg
        self.num_shards = num_shards
        self.model = LlamaModel(
            cfg.shard(num_shards),
            dtype=dtype,
            backend=attention_backend,
            rngs=rngs,
            shard_axis=shard_axis,
        )
        split_vocab = num_shards > 1 and cfg.vocab_size % num_shards == 0
        self.vocab_axis = shard_axis if split_vocab and not cfg.tie_word_embeddings else None
        vocab = cfg.vocab_size // num_shards if self.vocab_axis else cfg.vocab_size
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else Linear(cfg.hidden_size, vocab, bias=False, dtype=dtype, rngs=rngs)
        )

    def param_axes(self, path: tuple) -> tuple[str | None, ...]:
        """The logical axis names of the parameter at `path` (its place in the state:
        (..., "self_attn", "qkv_proj", "kernel")); unnamed axes are whole on every shard."""
        module, leaf = path[-2], path[-1]
        if module == "lm_head" and self.vocab_axis is None:
            return ()
        return _PARAM_AXES.get((module, leaf), ())

    def __call__(
        self,
        token_ids: jax.Array,
        positions: jax.Array,
        kv_caches: list[jax.Array],
        meta: AttentionMetadata,
    ) -> tuple[jax.Array, list[jax.Array]]:
        """token_ids, positions: [T] -> (hidden [T, D], updated per-layer kv caches)."""
        x = self.model.embed_tokens(token_ids)
        cfg = self.config
        inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)  # constant
        layers = self.model.layers
        fused = layers[0].fused_mode(token_ids.shape[0]) is not None
        if fused:  # the first layer's input norm's inputs; each layer makes the next one's
            norm_in = decode_matmul.norm_inputs(x, layers[0].input_layernorm.scale[...])
        new_caches = []
        for i, (layer, kv_cache) in enumerate(zip(layers, kv_caches, strict=True)):
            graphdef, state = nnx.split(layer)
            if fused:
                next_norm = (
                    layers[i + 1].input_layernorm if i + 1 < len(layers) else self.model.norm
                )
                args = (x, norm_in, next_norm.scale[...], positions, inv_freq, kv_cache, meta)
                (x, norm_in), kv_cache = _layer_call(graphdef, state, *args, method="fused")
            else:
                x, kv_cache = _layer_call(graphdef, state, x, positions, inv_freq, kv_cache, meta)
            new_caches.append(kv_cache)
        return self.model.norm(x), new_caches

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden: [R, D] -> float32 logits [R, V]."""
        if self.lm_head is None:
            w = self.model.embed_tokens.embedding[...]
            return jnp.einsum("rd,vd->rv", hidden, w, preferred_element_type=jnp.float32)
        logits = jnp.einsum(
            "rd,dv->rv", hidden, self.lm_head.kernel[...], preferred_element_type=jnp.float32
        )
        if self.vocab_axis is None:
            return logits
        return jax.lax.all_gather(logits, self.vocab_axis, axis=1, tiled=True)
