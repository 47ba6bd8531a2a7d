"""`qtool quantize`."""

from __future__ import annotations

import math
from dataclasses import replace
from collections import defaultdict
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from qtool.cli import options as opt
from qtool.cli._app import ProgressDisplay, handle_errors, human_bytes, out, print_json
from qtool.cli.method_options import with_method_options
from qtool.config import make_recipe
from qtool.formats import FORMATS
from qtool.recipe_file import load_recipe_file, merge, recipe_kwargs
from qtool.model.resolve import open_source
from qtool.errors import UsageError
from qtool.publish import check_push_flags
from qtool.pipeline import EvalRequest, RunReport, check_model, run, validate_formats


def default_out(model: str, recipe) -> Path:
    name = Path(model.rstrip("/")).name.removesuffix(".gguf").removesuffix(".safetensors")
    if recipe.method == "aqlm":  # its scheme, not the unused --bits / --group-size: model-aqlm-2x8
        from qtool.methods.params import resolve

        p = resolve("aqlm", recipe.method_params)
        return Path(f"{name}-aqlm-{p['codebooks']}x{p['codebook_bits']}" + (f"-g{p['in_group']}" if p["in_group"] != 8 else ""))
    g = f"g{recipe.group_size}" if recipe.strategy == "group" else recipe.strategy
    return Path(f"{name}-{recipe.method}-{recipe.qtype}-{g}{'' if recipe.symmetric else '-asym'}")


@handle_errors
def _quantize(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Local folder, .safetensors/.gguf file, or Hub id (org/name).")],
    method: opt.Method = "rtn",
    bits: opt.Bits = None,
    qtype: Annotated[Optional[str], typer.Option("--qtype", help="Weight type instead of --bits: int8, int4, int3, int2, fp8, nf4, fp4 (nf4/fp4: 4-bit tables, -f bitsandbytes; int6, int5, int1 for -m hqq) [default: the format's, else int4].")] = None,
    group_size: opt.GroupSize = "channel",
    asym: Annotated[Optional[bool], typer.Option("--asym/--sym", help="Asymmetric grid (with zero points) or symmetric [default: the method's: awq asymmetric, others symmetric].", show_default=False)] = None,
    fmt: opt.Format = "compressed-tensors",
    gguf_type: opt.GGUFType = None,
    imatrix: opt.Imatrix = None,
    tensor_type: Annotated[Optional[list[str]], typer.Option("--tensor-type", help="-f gguf: PATTERN=TYPE, llama-quantize's override: the first pattern (a regex, searched in the GGUF tensor name, e.g. attn_v=q8_0 or 'blk\\.[0-3]\\.ffn_down=q6_k') sets that tensor's type (repeatable).")] = None,
    target_bpw: Annotated[Optional[float], typer.Option("--target-bpw", help="Choose each layer's type (gguf) or bit-width (compressed-tensors, gptq) for the least importance-weighted error at this many bits per quantized weight, scales included (--imatrix / --stats weight the error).")] = None,
    target_size: Annotated[Optional[str], typer.Option("--target-size", help="As --target-bpw, for a whole output of this size: 4.5GB, 3500MiB, bytes.")] = None,
    double_quant: Annotated[bool, typer.Option("--double-quant", help="-f bitsandbytes nf4/fp4: store the block absmax values in 8 bits (blocks of 256), as bnb_4bit_use_double_quant.")] = False,
    activations: Annotated[Optional[str], typer.Option("--activations", help="-f torchao --qtype int8: 'int8' for dynamic per-token int8 activations (Int8DynamicActivationInt8WeightConfig) instead of weight-only.")] = None,
    out_path: opt.Out = None,
    target: Annotated[Optional[list[str]], typer.Option("--target", help="Quantize only modules matching this glob (repeatable).")] = None,
    ignore: Annotated[Optional[list[str]], typer.Option("--ignore", help="Leave modules matching this glob unquantized (repeatable).")] = None,
    strict_groups: Annotated[bool, typer.Option("--strict-groups", help="Fail instead of using a smaller group size where a layer's width needs one.")] = False,
    device: opt.Device = "cpu",
    dataset: opt.Dataset = None,
    dataset_config: opt.DatasetConfig = None,
    split: opt.Split = None,
    text_field: opt.TextField = None,
    samples: opt.Samples = 128,
    seq_len: opt.SeqLen = 512,
    seed: opt.Seed = 0,
    stats: Annotated[Optional[Path], typer.Option("--stats", help="gptq, awq: reuse the statistics of a `qtool calibrate` file instead of running calibration data (not sequential).")] = None,
    recipe_file: Annotated[Optional[Path], typer.Option("--recipe", help="Recipe file (YAML or JSON; the fields of a model card's Recipe section); options given here override it.")] = None,
    run_eval: Annotated[bool, typer.Option("--eval", help="After writing, score the output against the input model (perplexity, KL divergence, top-1 agreement); the figures go into --json and the model card.")] = False,
    eval_dataset: Annotated[Optional[Path], typer.Option("--eval-dataset", help="Text file for --eval [default: the --dataset file, its second half, which calibration never reads].")] = None,
    eval_windows: Annotated[int, typer.Option("--eval-windows", min=1, help="Windows of --eval-seq-len tokens scored by --eval.")] = 32,
    eval_seq_len: Annotated[int, typer.Option("--eval-seq-len", min=2, help="Tokens per --eval window.")] = 512,
    revision: opt.Revision = None,
    token: opt.Token = None,
    allow_pickle: opt.AllowPickle = False,
    trust_remote_code: opt.TrustRemoteCode = False,
    overwrite: opt.Overwrite = False,
    resume: Annotated[bool, typer.Option("--resume", help="Calibration methods: continue an interrupted run from its last complete block (the checkpoint beside -o); the output equals an uninterrupted run's, byte for byte.")] = False,
    push_to_hub: opt.PushToHub = None,
    private: opt.Private = False,
    push_branch: opt.PushBranch = None,
    nproc: Annotated[int, typer.Option("--nproc", help="Processes on this machine (torchrun, gloo on the CPU, nccl with --device cuda): calibration windows sharded across them, statistics all-reduced; calibration-free runs split the tensors. Rank 0 writes. The same as `torchrun --nproc-per-node N -m qtool quantize ...`.")] = 1,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Plan only, from headers (a Hub id: config, tokenizer and safetensors headers; no weights): what is quantized and how, size and bits per weight per format, peak memory and time estimates, and every refusal the run would hit (its exit code). Nothing is written.")] = False,
    json_out: opt.Json = False,
    quiet: opt.Quiet = False,
    **method_options: object,
) -> None:
    """Quantize a model and write it in a format runtimes load.

    Examples:

      qtool quantize HuggingFaceTB/SmolLM2-135M-Instruct -b 4 -g 64 -o smol-w4g64

      qtool quantize ./my-model -m rtn -b 8 -f compressed-tensors -o my-model-w8

      qtool quantize ./my-model --qtype fp8 -g tensor -o my-model-fp8

      qtool quantize ./my-model -b 4 -g 128 --asym --ignore '*down_proj' --json

      qtool quantize ./my-model -m gptq -b 4 -g 128 --dataset wikitext2 --samples 128 --seq-len 512

      qtool quantize ./my-model -f gguf -t Q4_K_M --imatrix imatrix.gguf -o my-model-Q4_K_M.gguf

      qtool quantize ./my-model -f gguf -t Q4_K_M --tensor-type attn_v=q8_0 --tensor-type 'blk\\.0\\.=q6_k'

      qtool quantize ./my-model -f gguf --target-bpw 4.5 --imatrix imatrix.gguf -o my-model-4.5bpw.gguf

      qtool quantize ./my-model -m gptq --target-bpw 5 -g 128 --dataset wikitext2 -o my-model-mixed

      qtool quantize ./my-model -m gptq -b 4 --dataset calib.txt --eval -o my-model-gptq

      qtool quantize ./my-model -f bitsandbytes --qtype nf4 --double-quant -o my-model-nf4

      qtool quantize ./my-model -f torchao --qtype int4 -g 32 -o my-model-ao-int4

      qtool quantize ./my-model -b 4 -g 128 -o my-model-w4 --push-to-hub me/my-model-w4   # needs HF_TOKEN

      qtool quantize meta-llama/Llama-3.1-8B -m gptq -b 4 -g 128 --dataset wikitext2 --dry-run   # headers only

      qtool quantize ./my-model -m gptq -b 4 --dataset calib.txt -o out --resume   # after an interrupted run

      qtool calibrate ./my-model --dataset wikitext2 -o stats.safetensors
      qtool quantize ./my-model -m gptq -b 4 -g 128 --stats stats.safetensors
    """
    if qtype is None and bits is None:  # a format made for one type defaults to it (bitsandbytes: nf4, fp8: fp8)
        defaults = {getattr(FORMATS.get(f.strip()), "default_qtype", None) for f in fmt.split(",") if f.strip()}
        qtype = defaults.pop() if len(defaults) == 1 else None
    kwargs = dict(
        method=method, bits=bits, qtype=qtype, group_size=group_size, asym=asym, fmt=fmt,
        targets=target, ignore=ignore, strict_groups=strict_groups, device=device,
        dataset=dataset, dataset_config=dataset_config, split=split, text_field=text_field,
        samples=samples, seq_len=seq_len, seed=seed, stats=str(stats) if stats else None,
        method_params={k: v for k, v in method_options.items() if v is not None},
        target_bpw=target_bpw, target_size=target_size,
    )
    if recipe_file is not None:
        kwargs = merge(kwargs, explicit_options(ctx), recipe_kwargs(load_recipe_file(recipe_file)))
    recipe = make_recipe(**kwargs)
    writers = validate_formats(recipe, recipe.format, type=gguf_type, imatrix=imatrix, double_quant=double_quant or None,
                               activations=activations, tensor_type=tensor_type or None)  # exit 2/3 here, before anything is loaded or downloaded
    many = "," in recipe.format
    if many and run_eval:
        raise UsageError(f"--eval with --format {recipe.format}: give one format, or run `qtool eval` on each output")
    evaluation = eval_request(run_eval, eval_dataset, recipe.dataset, eval_windows, eval_seq_len)
    dest = out_path or default_out(model, recipe)
    outs = [output_path(dest, w) if many else dest for w in writers]
    if dry_run:
        return plan_only(model, recipe, writers, outs, overwrite=overwrite, json_out=json_out, revision=revision, token=token,
                         allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                         checks=[("publish", lambda: check_push_flags(push_to_hub, token, private, push_branch, overwrite)),
                                 ("resume", lambda: resume_flags(resume, recipe, outs))])
    publish = check_push_flags(push_to_hub, token, private, push_branch, overwrite)  # before any weight is read
    resumes = resume_flags(resume, recipe, outs)
    from qtool.cli.launch import check_nproc, launched, run_launched, session

    from qtool.methods import METHODS

    if nproc != 1 or launched():
        calibrating = METHODS.get(recipe.method).needs_calibration and not recipe.stats
        check_nproc(nproc, recipe.samples if calibrating else None)
        if not launched():
            return run_launched(nproc)  # the same command under torchrun; rank 0 prints the summary
    reports = []
    with session(device) as comm, open_source(model, revision=revision, token=token, allow_pickle=allow_pickle) as source:
        # GGUF from a calibration-free method maps tensors by name: no model object is needed
        headers_only = all(w.self_quantizing for w in writers) and not METHODS.get(recipe.method).needs_calibration
        check_model(source, model, trust_remote_code, headers_only=headers_only)
        quiet = quiet or not comm.is_writer
        with ProgressDisplay(not (json_out or quiet)) as progress:
            for w, o in zip(writers, outs):  # one method run per writer group (formats/multi.py)
                r = run(model, source, o, w, replace(recipe, format=w.registry_name) if many else recipe,
                        overwrite=overwrite, evaluation=evaluation, on_event=progress, resume=resumes[o])
                if note := getattr(w, "imatrix_note", None):
                    r.notes.append(note)
                if many and w.self_quantizing and recipe.method != "rtn":
                    r.notes.append(f"--method {recipe.method} ran again for {w.registry_name}: it quantizes on each tensor's own grid")
                reports.append(r)
    if not comm.is_writer:
        return
    published = None
    if publish is not None:
        from qtool.publish import push

        published = push(dest, publish, progress=not (json_out or quiet))
        reports[-1].published = published
    if json_out:
        print_json({"formats": [r.format for r in reports], "outputs": [r.to_dict() for r in reports], "published": published}
                   if many else reports[0].to_dict())
    else:
        for r in reports:
            print_summary(r)


def output_path(dest: Path, writer) -> Path:
    """Where one format of `-f a,b,...` goes: `dest` itself for the shared run (one folder per format
    inside), `dest/<format>` for a lone folder format, `dest/<name>-<type>.gguf` for a file format."""
    if hasattr(writer, "parts"):
        return dest
    if writer.output_is_dir:
        return dest / writer.registry_name
    return dest / f"{dest.name}-{writer.describe() or writer.registry_name}.gguf"


quantize = with_method_options(_quantize)


def plan_only(model: str, recipe, writers, outs, *, json_out: bool, **kw) -> None:
    """--dry-run: the plan printed (or as JSON), exit code what the run would exit with."""
    from qtool.cli.dry_run import print_dry_run
    from qtool.dryrun import dry_run

    report = dry_run(model, recipe, writers, outs, **kw)
    if json_out:
        print_json(report.to_dict())
    else:
        print_dry_run(report)
    if report.exit_code:
        raise typer.Exit(report.exit_code)


def resume_flags(resume: bool, recipe, outs: list[Path]) -> dict[Path, bool]:
    """`--resume`, judged before the model is opened: which outputs continue from a checkpoint
    (several formats: those whose run was interrupted; the others run afresh). Exit 2 when the
    method runs no calibration blocks or no output has a checkpoint."""
    from qtool.engine.checkpoint import check_resumable, has_checkpoint
    from qtool.methods import METHODS

    if not resume:
        return {o: False for o in outs}
    if not METHODS.get(recipe.method).needs_calibration:
        raise UsageError(f"--resume: --method {recipe.method} runs no calibration blocks, so there is nothing to resume")
    found = {o: has_checkpoint(o) for o in outs}
    if not any(found.values()):
        check_resumable(outs[0])  # raises, naming where the checkpoint would be
    return found


def explicit_options(ctx: typer.Context) -> set[str]:
    """make_recipe keywords whose `quantize` option was given on the command line (or environment)."""
    names = {"target": "targets"}
    given = {p.name for p in ctx.command.params
             if getattr(ctx.get_parameter_source(p.name), "name", None) in ("COMMANDLINE", "ENVIRONMENT")}
    return {names.get(n, n) for n in given}


def eval_request(run_eval: bool, eval_dataset: Path | None, dataset: str | None, windows: int, seq_len: int) -> EvalRequest | None:
    if not run_eval:
        if eval_dataset is not None:
            raise UsageError("--eval-dataset: given without --eval")
        return None
    if eval_dataset is None:
        if dataset is None or Path(dataset).suffix != ".txt" or not Path(dataset).is_file():
            raise UsageError("--eval needs held-out text: give --eval-dataset FILE.txt (its second half is scored)")
        eval_dataset = Path(dataset)
    req = EvalRequest(eval_dataset, windows=windows, seq_len=seq_len)
    req.check()
    return req


def print_summary(r: RunReport) -> None:
    d = r.to_dict()
    t = Table(title=f"qtool quantize → {r.output}", show_header=False, title_justify="left")
    if r.format_type:
        how = "" if r.recipe["method"] == "rtn" else f"{r.recipe['method']} on each tensor's grid, "
        rules = "chosen for the target" if r.format_type.startswith("target-") else "chosen by the format's rules"
        t.add_row("recipe", f"{r.format_type} ({how}per-tensor types {rules})")
    else:
        mp = r.recipe.get("method_params") or {}
        if r.recipe["method"] == "aqlm":  # its scheme, not the (unused) integer type
            t.add_row("recipe", f"aqlm {mp.get('codebooks')}x{mp.get('codebook_bits')}, {mp.get('in_group')} input columns per code")
        else:
            t.add_row("recipe", f"{r.recipe['method']} {r.recipe['qtype']} " + (f"g{r.recipe['group_size']}" if r.recipe["group_size"] else f"per-{r.recipe['strategy']}") + (" sym" if r.recipe["symmetric"] else " asym"))
    t.add_row("format", r.format)
    t.add_row("time", f"{r.seconds:.1f} s")
    t.add_row("size", f"{human_bytes(r.input_bytes)} → {human_bytes(r.output_bytes)}")
    t.add_row("quantized", f"{len(r.layers)} layers, {r.params_quantized:,} of {r.params_total:,} parameters")
    t.add_row("bits per weight", f"{d['bpw_quantized']:.3f} (quantized layers, scales and zero points included)")
    t.add_row("SQNR", f"mean {d['sqnr_db_mean']} dB, worst {d['sqnr_db_min']} dB")
    if r.calibration:
        c = r.calibration
        src = f" (from {c['stats_file']})" if c.get("stats_file") else ""
        t.add_row("calibration", f"{c['spec']}: {c['samples']} x {c['seq_len']} tokens, seed {c['seed']}{src}")
        damps = sorted({layer.gptq["damp"] for layer in r.layers if layer.gptq and "damp" in layer.gptq})
        if damps:
            t.add_row("damping", ", ".join(f"{d:g}" for d in damps) + " x mean(diag H)")
    if r.eval:
        e = r.eval
        t.add_row("eval", f"ppl {e['perplexity']:.4f} (base {e['base_perplexity']:.4f}, x{e['ppl_ratio']:.4f}), "
                          f"KLD {e['kld_mean']:.5f}, top-1 {100 * e['top1_agreement']:.2f} % "
                          f"({e['windows']} x {e['seq_len']} tokens of {Path(e['dataset']).name}, {e['part']} part)")
    if r.published:
        t.add_row("published", f"{r.published['url']} ({len(r.published['files'])} files"
                               + (f", branch {r.published['branch']}" if r.published.get("branch") else "") + ")")
    for n in r.notes:
        t.add_row("[yellow]note[/]", n)
    out.print(t)
    by_kind: dict[str, list[float]] = defaultdict(list)
    layouts: dict[str, dict[str, None]] = defaultdict(dict)
    for layer in r.layers:
        kind = layer.name.removesuffix(".weight").rsplit(".", 1)[-1]
        by_kind[kind].append(layer.sqnr_db)
        layouts[kind][f"g{layer.group_size}" if layer.group_size else layer.strategy] = None
    k = Table("layer kind", "layers", "layout", "SQNR mean (dB)", "SQNR worst (dB)", title="per-layer error", title_justify="left")
    for kind, vals in by_kind.items():
        fin = [v for v in vals if math.isfinite(v)] or [math.inf]
        k.add_row(kind, str(len(vals)), ", ".join(layouts[kind]), f"{sum(fin) / len(fin):.2f}", f"{min(fin):.2f}")
    out.print(k)
