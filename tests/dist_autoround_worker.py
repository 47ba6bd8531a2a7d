"""A rank of tests/test_distributed.py's learned-rounding check (torch.multiprocessing.spawn, gloo)."""

import os

import torch


def make_block(n: int = 16, length: int = 32):
    """tests/test_autoround.py's block: a tiny llama's layer 0, its inputs and float outputs."""
    from qtool.core.qweight import QuantizedWeight  # noqa: F401  (import order as the test's)
    from qtool.methods.autoround import block_outputs
    from qtool.methods.base import LayerSpec
    from qtool.qtypes import get_qtype
    from tiny_models import make_model

    torch.manual_seed(0)
    model = make_model("llama").float()
    layer = model.model.layers[0]
    ids = torch.randint(0, 256, (n, length))
    with torch.no_grad():
        h = model.model.embed_tokens(ids)
        pos = torch.arange(length).unsqueeze(0)
        pe = model.model.rotary_emb(h, pos)
    call = ((), dict(position_embeddings=pe, attention_mask=None, position_ids=pos))
    hidden = [h[i : i + 1] for i in range(n)]
    names = [m for m, mod in layer.named_modules() if isinstance(mod, torch.nn.Linear)]
    weights = {m: layer.get_submodule(m).weight.detach().to(torch.bfloat16) for m in names}
    specs = {m: LayerSpec(m, get_qtype("int4"), "group", 32, True, torch.bfloat16) for m in names}
    return layer, hidden, call, block_outputs(layer, hidden, call), specs, weights


def tune_shard(rank: int, world: int, port: int, kwargs: dict, out: str) -> None:
    import torch.distributed as dist

    from qtool.engine.distributed import Comm, activate
    from qtool.methods.autoround import AutoRoundParams, tune_block

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    layer, hidden, call, targets, specs, weights = make_block()
    comm = Comm(rank, world, rank, "gloo")
    r = comm.shard(len(hidden))
    with activate(comm):
        qws, st = tune_block(layer, specs, hidden[r.start:r.stop], call, targets[r.start:r.stop], AutoRoundParams(**kwargs),
                             weights=weights)
    torch.save({"codes": {m: q.codes for m, q in qws.items()}, "losses": st.losses, "reduced": comm.bytes_reduced},
               f"{out}/rank{rank}.pt")
    dist.destroy_process_group()
