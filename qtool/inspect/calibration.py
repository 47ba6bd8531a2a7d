"""`qtool inspect` for calibration files: qtool statistics and llama.cpp importance matrices."""

from __future__ import annotations

from pathlib import Path


# -- calibration files: qtool statistics and llama.cpp importance matrices ----------------------------


def calibration_file_summary(target: str) -> dict | None:
    """What a `qtool calibrate` statistics file or a llama.cpp imatrix holds; None for anything else
    (a checkpoint), so that `inspect` reports those as usual. A checkpoint is told apart from its
    header alone, before anything heavy (torch, gguf-py) is imported."""
    from qtool.model.safetensors_header import read_header

    path = Path(target).expanduser()
    if not path.is_file():
        return None
    if path.suffix == ".safetensors":
        tag = read_header(path).metadata.get("format")
        if not str(tag).startswith("qtool."):  # qtool's own file tags; a checkpoint says "pt" or nothing
            return None
        from qtool.calib.stats import FORMAT_TAG, CalibStats

        if tag != FORMAT_TAG:
            return None
        s = CalibStats(path, flag="inspect")
        c = s.calibration
        return {"kind": "qtool calibration statistics", "file": str(path), "bytes": path.stat().st_size,
                "model": s.model, "linears": len(s.modules), "distinct_inputs": len({e.owner for e in s.modules.values()}),
                "hessians": s.has_hessians, "calibration": {k: c.get(k) for k in ("spec", "samples", "seq_len", "seed", "tokens")}}
    if path.suffix in (".gguf", ".dat"):
        if path.suffix == ".gguf":
            from qtool.model.gguf_header import GGUFHeader

            if GGUFHeader(path).get("general.type") != "imatrix":
                return None
        from qtool.formats.gguf.imatrix import read_imatrix

        imx = read_imatrix(path)
        return {"kind": "llama.cpp importance matrix" + (" (legacy .dat layout)" if imx.legacy else " (GGUF layout)"),
                "file": str(path), "bytes": path.stat().st_size, "entries": len(imx.entries),
                "chunks": imx.chunk_count, "chunk_size": imx.chunk_size or None, "datasets": imx.datasets}
    return None
