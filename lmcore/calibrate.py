"""Self-generated calibration tokens for GPTQ (SPEC section 5): no training data is read.

`sample_calibration(model, qcfg, device, bf16)` returns `qcfg.calib_seqs` sequences of
`qcfg.calib_len` tokens sampled from the model itself at `qcfg.calib_temperature`: the
first token of each sequence is uniform over the vocabulary, every later one is drawn
from softmax(logits / T). One `torch.Generator` on the sampling device, seeded with
`qcfg.calib_seed`, draws everything: first `randint` for the first tokens of a batch,
then one (batch, vocab) tensor of Exp(1) noise per step, and the next token is
argmax(logits / T - log(noise)) (the exponential-race form of multinomial sampling,
Gumbel-max). Batches of `qcfg.calib_batch` sequences are sampled in order.

Decoding uses the model's static `KVCache` (one token per call), so a step costs one
token's compute instead of the whole prefix (the original recomputes the prefix every
step: 33.9 s for 8 sequences on an H100). On CUDA the step (forward, noise, argmax,
write of the token) is captured once in a CUDA graph and replayed for every position:
the cache position is a 0-d device tensor, so one graph serves every step; only the
noise is drawn outside the graph, into a static buffer. If capture fails the same step
runs eagerly (`info["mode"]` says which). On CPU the step always runs eagerly.

RoPE: the cache holds the cos/sin tables of `calib_len` positions, so every token is
rotated with the tables of a `calib_len`-long sequence (for 2048, the NTK-rescaled base
of a 2048-token sequence, as the model is trained and evaluated). The original
recomputed the prefix with a base that depended on the current prefix length (the plain
base up to 1024 tokens, rescaled past it). `sample_reference` is that prefix-recomputing
sampler, with the same random stream; with `calib_len <= rope_train_len` (no rescaling)
both give the same tokens, which the tests check.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch
from torch import Tensor

from lmcore.errors import InputError
from lmcore.model import GPT, KVCache


def _make_cache(model: GPT, batch: int, length: int, device: torch.device, dtype: torch.dtype) -> KVCache:
    return KVCache(model, batch=batch, max_len=length, device=device, dtype=dtype)


def _autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    if not bf16:
        return contextlib.nullcontext()
    # no weight-cast cache: required inside CUDA-graph capture, harmless elsewhere
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=False)


class _Decoder:
    """One batch of cached sampling: static buffers, the step, optional CUDA graph."""

    def __init__(self, model: GPT, batch: int, length: int, temperature: float, device: torch.device, bf16: bool):
        self.model, self.batch, self.length = model, batch, length
        self.inv_t = 1.0 / temperature
        self.device, self.bf16 = device, bf16
        vocab = model.cfg.vocab_size
        dtype = torch.bfloat16 if bf16 else torch.float32
        self.cache = _make_cache(model, batch, length, device, dtype)
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.noise = torch.ones(batch, vocab, dtype=torch.float32, device=device)
        self.out = torch.zeros(batch, length, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None

    def step(self) -> None:
        """Feed `tok` at cache.pos, sample the next token into `tok` and `out[:, pos+1]`."""
        with _autocast(self.device, self.bf16):
            logits = self.model(self.tok, cache=self.cache)  # advances cache.pos
        scores = logits[:, -1].float() * self.inv_t - torch.log(self.noise)
        nxt = scores.argmax(dim=-1, keepdim=True)
        self.tok.copy_(nxt)
        self.out.index_copy_(1, self.cache.pos.view(1), nxt)

    def reset(self, first: Tensor) -> None:
        self.cache.reset()
        for k, v in zip(self.cache.k, self.cache.v):
            k.zero_()
            v.zero_()
        self.tok.copy_(first)
        self.out.zero_()
        self.out[:, :1].copy_(first)

    def capture(self) -> None:
        """Warm the step up on a side stream, then capture it in a CUDA graph."""
        first = torch.zeros(self.batch, 1, dtype=torch.long, device=self.device)
        self.reset(first)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.reset(first)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.step()
        self.graph = graph

    def check_graph(self, steps: int = 4) -> bool:
        """Replay the graph for a few steps and compare with the eager step (same inputs)."""
        if self.graph is None:
            return False
        g = torch.Generator(device=self.device)
        first = torch.randint(0, self.noise.shape[1], (self.batch, 1), generator=g.manual_seed(0), device=self.device)
        results = []
        steps = min(steps, self.length - 1)
        for use_graph in (False, True):
            self.reset(first)
            g.manual_seed(1)
            for _ in range(steps):
                self.noise.exponential_(generator=g)
                if use_graph:
                    self.graph.replay()
                else:
                    self.step()
            results.append((self.out[:, 1 : steps + 1].clone(), self.cache.pos.clone()))
        (o1, p1), (o2, p2) = results
        # the same kernels run either way; allow a rare near-tie flip, not a broken graph
        agree = (o1 == o2).float().mean().item()
        return bool(torch.equal(p1, p2) and agree >= 0.9)

    def run(self, first: Tensor, gen: torch.Generator) -> Tensor:
        self.reset(first)
        for _ in range(self.length - 1):
            self.noise.exponential_(generator=gen)
            if self.graph is not None:
                self.graph.replay()
            else:
                self.step()
        return self.out.clone()


@torch.no_grad()
def sample_calibration(
    model: GPT,
    qcfg: Any,
    device: torch.device | str,
    bf16: bool,
    use_graph: bool | None = None,
    info: dict | None = None,
    progress: bool = False,
) -> Tensor:
    """(calib_seqs, calib_len) int64 tokens (CPU) sampled from `model` on `device`.

    `qcfg` is a QuantConfig (calib_seqs, calib_len, calib_temperature, calib_seed,
    calib_batch). `use_graph` (default: on CUDA) captures the decode step in a CUDA
    graph, falling back to eager if capture fails. `info`, if given, receives the mode,
    seconds, tokens per second and the batch size.
    """
    device = torch.device(device)
    n, L = int(qcfg.calib_seqs), int(qcfg.calib_len)
    if n <= 0 or L <= 0:
        raise InputError(f"quant.calib_seqs={n}, quant.calib_len={L}: calibration needs both > 0")
    batch = max(1, min(int(qcfg.calib_batch), n))
    vocab = model.cfg.vocab_size
    if use_graph is None:
        use_graph = device.type == "cuda"
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    gen = torch.Generator(device=device)
    gen.manual_seed(int(qcfg.calib_seed))
    mode = "eager"
    decoders: dict[int, _Decoder] = {}
    outs = []
    try:
        for start in range(0, n, batch):
            b = min(batch, n - start)
            dec = decoders.get(b)
            if dec is None:
                dec = _Decoder(model, b, L, float(qcfg.calib_temperature), device, bf16)
                if use_graph and device.type == "cuda":
                    try:
                        dec.capture()
                        if dec.check_graph():
                            mode = "cuda_graph"
                        else:
                            dec.graph = None
                            mode = "eager (CUDA graph replay differed from the eager step)"
                    except Exception as e:  # noqa: BLE001 - capture unsupported here: run the same step eagerly
                        dec.graph = None
                        torch.cuda.synchronize(device)
                        mode = f"eager (CUDA graph capture failed: {type(e).__name__}: {str(e)[:200]})"
                decoders[b] = dec
            first = torch.randint(0, vocab, (b, 1), generator=gen, device=device)
            outs.append(dec.run(first, gen).cpu())
            if progress:
                done = start + b
                el = time.perf_counter() - t0
                print(f"calibration: {done}/{n} sequences of {L} tokens, {el:.1f}s", flush=True)
    finally:
        model.train(was_training)
    tokens = torch.cat(outs, dim=0)
    secs = time.perf_counter() - t0
    if info is not None:
        info.update(
            mode=mode,
            seconds=secs,
            tokens_per_s=n * L / secs if secs > 0 else float("inf"),
            batch=batch,
            seqs=n,
            seq_len=L,
        )
    return tokens


@torch.no_grad()
def sample_reference(
    model: GPT,
    qcfg: Any,
    device: torch.device | str,
    bf16: bool = False,
) -> Tensor:
    """The same sampling without a cache: the whole prefix is recomputed every step.

    Same generator stream as `sample_calibration` (randint for the first tokens, then one
    (batch, vocab) Exp(1) draw per step). Slow; for tests and comparisons.
    """
    device = torch.device(device)
    n, L = int(qcfg.calib_seqs), int(qcfg.calib_len)
    batch = max(1, min(int(qcfg.calib_batch), n))
    vocab = model.cfg.vocab_size
    inv_t = 1.0 / float(qcfg.calib_temperature)
    gen = torch.Generator(device=device)
    gen.manual_seed(int(qcfg.calib_seed))
    was_training = model.training
    model.eval()
    outs = []
    noise = torch.empty(batch, vocab, dtype=torch.float32, device=device)
    try:
        for start in range(0, n, batch):
            b = min(batch, n - start)
            toks = torch.randint(0, vocab, (b, 1), generator=gen, device=device)
            nz = noise[:b]
            for _ in range(L - 1):
                nz.exponential_(generator=gen)
                with _autocast(device, bf16):
                    logits = model(toks)
                scores = logits[:, -1].float() * inv_t - torch.log(nz)
                toks = torch.cat([toks, scores.argmax(dim=-1, keepdim=True)], dim=1)
            outs.append(toks.cpu())
    finally:
        model.train(was_training)
    return torch.cat(outs, dim=0)
