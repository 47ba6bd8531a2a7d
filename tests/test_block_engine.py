"""The block-level method engine (qtool/engine/block_engine.py): GPTQ through the contract is
bit-identical to the block-wise path it replaced; activations on disk equal those in RAM."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from qtool.methods import METHODS
from qtool.methods.base import LayerSpec
from qtool.qtypes import get_qtype

SAMPLES, SEQ = 3, 48


@pytest.fixture(scope="module")
def ids(tiny_byte_llama, wiki_sample):
    from transformers import AutoTokenizer

    from qtool.calib.data import load_calibration

    return load_calibration(str(wiki_sample), AutoTokenizer.from_pretrained(tiny_byte_llama), samples=SAMPLES, seq_len=SEQ).input_ids


def _specs(src, **kw):
    names = [m.name for m in src.tensors() if ".layers." in m.name and m.name.endswith("_proj.weight")]
    return {n: LayerSpec(n, get_qtype(kw.get("qtype", "int4")), "group", 32, kw.get("symmetric", True)) for n in names}


def _items(gen):
    from qtool.engine.blockwise import PassThrough, QuantizedLinear

    out = {}
    for it in gen:
        if isinstance(it, QuantizedLinear):
            out[it.name] = (it.qw, it.stats if isinstance(it.stats, dict) else it.stats.__dict__, it.shares_hessian_with, it.weight)
        elif isinstance(it, PassThrough):
            out[it.name] = it.tensor
    return out


@pytest.mark.parametrize("params", [{}, {"act_order": True}], ids=["default", "act-order"])
def test_gptq_through_the_block_contract_is_bit_identical_to_the_old_path(tiny_byte_llama, ids, params):
    """Same codes, scales, zero points, g_idx, per-layer stats and pass-through tensors, bit for
    bit, as engine/blockwise.py's run_blockwise (the path before the contract)."""
    from qtool.engine.block_engine import run_block_method
    from qtool.engine.blockwise import run_blockwise
    from qtool.model.resolve import open_source

    with open_source(str(tiny_byte_llama)) as src:
        specs = _specs(src, symmetric=False)
        old = _items(run_blockwise(src, specs, METHODS.get("gptq")(**params), ids))
        new = _items(run_block_method(src, specs, METHODS.get("gptq")(**params), ids))
    assert list(old) == list(new)  # same tensors, same order
    n_q = 0
    for name, a in old.items():
        b = new[name]
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a, b), name
            continue
        n_q += 1
        qa, qb = a[0], b[0]
        assert torch.equal(qa.codes, qb.codes) and torch.equal(qa.scale, qb.scale) and qa.scale.dtype == qb.scale.dtype, name
        assert torch.equal(qa.zero_point, qb.zero_point), name
        assert (qa.g_idx is None) == (qb.g_idx is None) and (qa.g_idx is None or torch.equal(qa.g_idx, qb.g_idx)), name
        assert a[1] == b[1] and a[2] == b[2], name  # stats (loss, damping...) and the shared-Hessian owner
        assert torch.equal(a[3], b[3])  # the weight the error is measured against
    assert n_q == 14


def test_gptq_amp_runs_every_block_forward_under_bf16_autocast(tiny_byte_llama, ids, tmp_path, monkeypatch):
    """`-m gptq --amp` (the method's forward_dtype): the method's Hessian passes and the engine's
    forward for the next block's inputs compute their linears in bf16; without it, float32. The
    result stays GPTQ on nearly the same Hessians: most codes equal the float32 run's. On a CPU
    without bf16 instructions the engine says so in each block's notes. With it, attention runs
    through sdpa; the one exception per block is the float32 probe that checks sdpa gives eager's
    outputs (one eager and one sdpa forward of sample 0). Without it, eager throughout."""
    from collections import Counter

    from torch.nn.modules.module import register_module_forward_hook

    from qtool import devices
    from qtool.engine.block_engine import BlockNote, run_block_method
    from qtool.model.resolve import open_source

    (tmp_path / "cpuinfo").write_text("processor\t: 0\nflags\t\t: fpu sse avx2 fma\n")
    monkeypatch.setattr(devices, "CPUINFO", str(tmp_path / "cpuinfo"))
    seen: dict[bool, Counter] = {}
    notes: dict[bool, list] = {}
    attention: dict[bool, Counter] = {}

    def run(amp: bool) -> dict:
        dtypes = seen.setdefault(amp, Counter())
        impls = attention.setdefault(amp, Counter())

        def hook(module, args, out):
            if isinstance(module, torch.nn.Linear):
                dtypes[out.dtype] += 1
            elif type(module).__name__.endswith("Attention"):
                impls[module.config._attn_implementation] += 1

        handle = register_module_forward_hook(hook)
        try:
            with open_source(str(tiny_byte_llama)) as src:
                items = list(run_block_method(src, _specs(src), METHODS.get("gptq")(amp=amp), ids))
                notes[amp] = [it.text for it in items if isinstance(it, BlockNote)]
                return _items(items)
        finally:
            handle.remove()

    f32, bf16 = run(False), run(True)
    assert set(seen[False]) == {torch.float32} and set(seen[True]) == {torch.float32, torch.bfloat16}
    linears = sum(1 for a in f32.values() if not isinstance(a, torch.Tensor))  # quantized, over all blocks
    assert seen[True][torch.float32] == 2 * linears < seen[True][torch.bfloat16], seen  # the two probe forwards only
    assert set(attention[False]) == {"eager"} and attention[True]["eager"] == 2 < attention[True]["sdpa"], attention
    assert notes[False] == [] and len(notes[True]) == 2 and all(n.startswith("gptq: --amp on a CPU without bf16") for n in notes[True])
    codes = [(a[0].codes, bf16[n][0].codes) for n, a in f32.items() if not isinstance(a, torch.Tensor)]
    equal = sum(int((a == b).sum()) for a, b in codes) / sum(a.numel() for a, _ in codes)
    assert 0.8 < equal < 1.0, equal  # bf16 activations move some roundings, not the method
    assert all(torch.isfinite(torch.tensor(b[1]["loss"])) for b in bf16.values() if not isinstance(b, torch.Tensor))


def test_activations_on_disk_equal_ram(tiny_byte_llama, ids, monkeypatch):
    from qtool.engine import activations
    from qtool.engine.block_engine import run_block_method
    from qtool.model.resolve import open_source

    made = []
    real = activations.ActivationStore.__init__

    def spy(self, n, shape, where="ram"):
        made.append(where)
        real(self, n, shape, where)

    monkeypatch.setattr(activations.ActivationStore, "__init__", spy)
    runs = {}
    for where in ("ram", "disk"):
        monkeypatch.setenv("QTOOL_ACTIVATIONS", where)
        with open_source(str(tiny_byte_llama)) as src:
            runs[where] = _items(run_block_method(src, _specs(src), METHODS.get("gptq")(), ids))
    assert "disk" in made and "ram" in made
    for name, a in runs["ram"].items():
        b = runs["disk"][name]
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else torch.equal(a[0].codes, b[0].codes), name


def test_storage_choice_follows_available_memory(monkeypatch):
    from qtool.engine import activations

    monkeypatch.delenv("QTOOL_ACTIVATIONS", raising=False)
    monkeypatch.setattr(activations, "available_memory", lambda: 1 << 30)
    assert activations.choose_storage(128, (1, 512, 576)) == "ram"  # 3 x 151 MB <= 512 MB
    assert activations.choose_storage(128, (1, 512, 2048)) == "disk"  # 3 x 537 MB > 512 MB


class _TargetSpy:
    """A block method (RTN weights) that records, per block, the targets the engine hands it."""

    def __new__(cls, stream: str):
        from qtool.core.affine import quantize_int
        from qtool.methods.base import BlockMethod, BlockResult

        class Spy(BlockMethod):
            registry_name = "target-spy"
            wants_targets = True
            target_stream = stream
            seen: list = []

            def quantize_block(self, block, inputs, specs, targets, progress):
                self.seen.append(torch.cat([targets[i] for i in range(len(targets))]))
                return BlockResult({m: quantize_int(block.get_submodule(m).weight, s.qtype, strategy=s.strategy,
                                                    group_size=s.group_size, symmetric=s.symmetric)
                                    for m, s in specs.items()})

        return Spy()


def test_model_stream_targets_are_the_float_models_hidden_states(tiny_byte_llama, ids):
    """`target_stream = "model"`: block b's targets are the unquantized model's hidden states after
    block b (transformers' own forward, output_hidden_states), not the float block on the quantized
    inputs; the two agree on block 0 (same inputs) and part from block 1 on (int2: large errors)."""
    from transformers import AutoModelForCausalLM

    from qtool.engine.block_engine import run_block_method
    from qtool.model.resolve import open_source

    seen = {}
    for stream in ("model", "block"):
        spy = _TargetSpy(stream)
        with open_source(str(tiny_byte_llama)) as src:
            list(run_block_method(src, _specs(src, qtype="int2"), spy, ids))
        seen[stream] = spy.seen
    model = AutoModelForCausalLM.from_pretrained(tiny_byte_llama, dtype=torch.float32)
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states  # embeddings, then after each block (the last normed)
    n = len(seen["model"])
    assert n == model.config.num_hidden_layers >= 2
    for b in range(n - 1):
        torch.testing.assert_close(seen["model"][b], hs[b + 1], rtol=1e-4, atol=1e-4)
    assert torch.equal(seen["model"][0], seen["block"][0])
    assert not torch.allclose(seen["model"][1], seen["block"][1], rtol=1e-3, atol=1e-3)


def test_stores_alive_counts_the_targets_and_the_float_stream_is_released(tiny_byte_llama, ids, monkeypatch):
    """Inputs and outputs always; the targets where a method wants them (what the RAM-or-disk choice
    and --dry-run count). The float model's stream adds none: its inputs are released once the
    targets (its outputs) are computed, before the method runs (measured on the random 1.1 B at
    128 x 512: 5.75 GiB peak before, learned rounding's budget is 4 GiB)."""
    from qtool.engine.activations import ActivationStore, stores_alive
    from qtool.engine.block_engine import run_block_method
    from qtool.model.resolve import open_source

    assert stores_alive(METHODS.get("gptq")()) == 2
    assert stores_alive(METHODS.get("autoround")(iters=0)) == 2
    assert stores_alive(METHODS.get("autoround")(tune_toward="block")) == 3
    assert stores_alive(METHODS.get("autoround")()) == stores_alive(METHODS.get("autoround")) == 3
    import weakref

    alive = []
    real = ActivationStore.__init__
    monkeypatch.setattr(ActivationStore, "__init__", lambda self, *a, **k: alive.append(weakref.ref(self)) or real(self, *a, **k))
    spy = _TargetSpy("model")
    counts = []
    inner = type(spy).quantize_block

    def counting(self, *a):
        counts.append(sum(s() is not None and s().n > 0 for s in alive))
        return inner(self, *a)

    monkeypatch.setattr(type(spy), "quantize_block", counting)
    with open_source(str(tiny_byte_llama)) as src:
        list(run_block_method(src, _specs(src), spy, ids))
    assert counts == [2, 2]  # while the method runs: its inputs and its targets (3 with the float stream's inputs)


@pytest.mark.parametrize("stream", ["model", "block"])
def test_a_block_with_no_targeted_linear_is_carried_through_not_handed_to_the_method(tiny_byte_llama, ids, stream):
    """--target / --ignore leaving a block without a quantized linear: the method never sees it (a
    learned-rounding run would otherwise tune nothing for hundreds of iterations), its tensors pass
    through unchanged, and the streams after it are what they would be: the targets of the next
    block equal the float model's hidden states there."""
    from qtool.engine.block_engine import run_block_method
    from qtool.model.resolve import open_source

    runs = {}
    for only in (None, ".layers.1."):
        spy = _TargetSpy(stream if only else "model")
        with open_source(str(tiny_byte_llama)) as src:
            specs = {n: s for n, s in _specs(src, qtype="int2").items() if only is None or only in n}
            items = _items(run_block_method(src, specs, spy, ids))
            runs[only] = spy.seen
    assert len(runs[None]) == 2 and len(runs[".layers.1."]) == 1
    torch.testing.assert_close(runs[".layers.1."][0], runs[None][1], rtol=1e-6, atol=1e-6)
    with open_source(str(tiny_byte_llama)) as src:
        for name, t in items.items():
            if ".layers.0." in name:
                assert torch.equal(t, src.get_tensor(name)), name


def test_blocks_after_the_last_targeted_one_pass_through_without_a_forward(tiny_byte_llama, ids, monkeypatch):
    """Only block 0 quantized: block 1 is neither handed to the method nor run (a 1.1 B run with
    --target on its first block stops computing there); its tensors are the checkpoint's, the same
    names a full run writes."""
    from qtool.engine import block_engine
    from qtool.model.resolve import open_source

    calls = []
    real = block_engine.forward_into
    monkeypatch.setattr(block_engine, "forward_into", lambda *a, **k: calls.append(a[-1]) or real(*a, **k))
    spy = _TargetSpy("block")
    with open_source(str(tiny_byte_llama)) as src:
        full = _items(block_engine.run_block_method(src, _specs(src), _TargetSpy("block"), ids))
        calls.clear()
        only0 = _items(block_engine.run_block_method(src, {n: s for n, s in _specs(src).items() if ".layers.0." in n}, spy, ids))
        assert len(spy.seen) == 1 and calls == ["float", "quantized"]  # block 0's targets and outputs only
        assert only0.keys() == full.keys()
        for name, t in only0.items():
            if ".layers.1." in name:
                assert torch.equal(t, src.get_tensor(name)), name


def test_a_blocks_items_are_not_kept_alive_while_the_next_block_runs(tiny_byte_llama, ids):
    """Once the pipeline has taken block b's items, the engine holds none of them while it computes
    block b + 1 (on a 1.1 B model, a block's items kept their checkpoint pages and codes resident)."""
    import gc
    import weakref

    from qtool.engine.block_engine import run_block_method
    from qtool.engine.blockwise import QuantizedLinear
    from qtool.model.resolve import open_source

    refs: list = []
    alive_at_block_1: list[bool] = []

    def progress(stage, done, total, item):
        if stage == "quantize" and done == 1 and not alive_at_block_1:
            gc.collect()
            alive_at_block_1.extend(r() is not None for r in refs)

    with open_source(str(tiny_byte_llama)) as src:
        for it in run_block_method(src, _specs(src), METHODS.get("gptq")(), ids, progress=progress):
            if isinstance(it, QuantizedLinear) and it.name.startswith(src.structure.block_prefixes()[0] + "."):
                refs.append(weakref.ref(it.qw))
            del it
    assert refs and alive_at_block_1, "block 1 was never reached"
    assert not any(alive_at_block_1), "block 0's quantized weights were still referenced when block 1 began"


_HEAP_PROBE = r"""
import ctypes, ctypes.util, json, torch
from qtool.engine import heap

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
# glibc releases the top of the heap inside free() once it exceeds M_TRIM_THRESHOLD, and whether the
# freed blocks below reach the top depends on where earlier frees left holes for the small live
# tensors: set the thresholds so that free() alone never gives heap back, whatever the layout
libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: 64 KiB blocks come from the heap, never their own mapping

def anon():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

blocks, pins = [], []
for _ in range(4000):  # 64 KiB each, each followed by a small live one
    blocks.append(torch.ones(16 * 1024))
    pins.append(torch.ones(16))
before = anon()
del blocks
freed = anon()
released = heap.trim()
after = anon()
print(json.dumps({"before": before, "freed": freed, "after": after, "released": released}))
"""


def test_heap_trim_hands_fragmented_free_heap_back():
    """engine/heap.py: freed heap memory stays resident until trim() (glibc); trim() gives it back.
    In a fresh process (the heap of a long test worker is full of holes of every size), with glibc's
    thresholds set so that free() alone keeps ~250 MiB of freed tensors. Skipped where the C library
    has no malloc_trim."""
    from qtool.engine import heap

    if not heap._malloc_trim():
        pytest.skip("no glibc malloc_trim here")
    done = subprocess.run([sys.executable, "-c", _HEAP_PROBE], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "QTOOL_MALLOC_TRIM": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    m = json.loads(done.stdout.strip().splitlines()[-1])
    assert m["before"] - m["freed"] < 64 << 20, f"free() alone returned the memory: the test shows nothing here ({m})"
    assert m["released"] is True
    assert m["freed"] - m["after"] > 150 << 20, f"trim released {(m['freed'] - m['after']) >> 20} MiB of ~250"


def test_heap_trim_can_be_turned_off(monkeypatch):
    from qtool.engine import heap

    monkeypatch.setenv("QTOOL_MALLOC_TRIM", "0")
    assert heap.trim() is False


def test_a_pass_run_for_its_hooks_holds_no_outputs():
    """BlockInputs.run(outputs=False) (the statistics passes of GPTQ, AWQ, importance RTN): every
    sample reaches the hooks, and no output is kept for the caller to drop at the end."""
    from qtool.methods.base import BlockInputs

    block = torch.nn.Sequential(torch.nn.Linear(8, 8))
    seen = []
    block[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    hidden = [torch.randn(1, 4, 8) for _ in range(5)]
    inputs = BlockInputs("b", hidden, ((), {}), torch.device("cpu"))
    assert inputs.run(block, outputs=False) == [None] * 5 and len(seen) == 5
    outs = inputs.run(block)
    assert all(torch.equal(o, block(h)) for o, h in zip(outs, hidden))
