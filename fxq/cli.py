"""The ``fxq`` command line: a thin recipe over loading, capture, passes and the pipeline.

Error contract: a problem the user can fix is an ``FxqError`` and prints as one ``error:``
paragraph with its exit code (2 by default); ``--debug`` adds the traceback. Anything else is an
internal error (exit 1). Ctrl-C exits 130. Every option is validated before the model or data is
loaded, so a typo costs milliseconds, not a model load. torch is imported only when needed, which
keeps ``fxq --help`` and option errors instant.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Iterator, Sequence

from rich.console import Console
from rich.text import Text

# Before torch (and its OpenMP runtime) loads: idle OpenMP threads sleep instead of spinning. On
# a shared 2-core machine spinning threads starve each other, and compiles ran 10-25x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import __version__
from . import options as opts
from .errors import CalibrationDataError, FxqError, ModelLoadError

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141


class UsageError(FxqError):
    """A command-line option has an invalid value."""


# --------------------------------------------------------------------------- parser


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL",
                   help="torch.export archive (any name), package.module:factory, torchvision:NAME, "
                        "or a pickled module (with --trust-pickle)")
    p.add_argument("--input-shape", metavar="S",
                   help="model input shape, batch first, e.g. 1,3,224,224 (';' between several "
                        "inputs); needed for factories and pickled modules")
    p.add_argument("--weights", metavar="FILE",
                   help="state dict to load into the model (.pt/.pth via weights_only, or .safetensors)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow unpickling MODEL (runs code from the file: only for trusted files)")
    p.add_argument("--granularity", choices=opts.GRANULARITIES, default="block",
                   help="region size: layer, block (default), stage or net")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON to stdout")
    p.add_argument("--debug", action="store_true",
                   help="show tracebacks and torch's warnings and logs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fxq", description="Post-training quantization compiler for PyTorch models.")
    parser.add_argument("--version", action="version", version=f"fxq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    ins = sub.add_parser("inspect", help="show the regions (blocks) fxq finds in a model",
                         description="Load MODEL, capture it and print the regions block "
                                     "detection finds.")
    _add_model_args(ins)
    ins.set_defaults(func=cmd_inspect)

    com = sub.add_parser("compile", help="quantize a model and write ONNX + report",
                         description="Quantize MODEL with calibration data and write "
                                     "model.onnx, model.pt2 and report.json to OUT.")
    _add_model_args(com)
    com.add_argument("--calib", metavar="DATA", required=True,
                     help="calibration data: folder of images, .pt tensor [N,...], or .npz")
    com.add_argument("-o", "--out", metavar="OUT", default="fxq-out",
                     help="output folder (default: fxq-out)")
    com.add_argument("--backend", choices=opts.BACKENDS, default="onnx-qdq")
    com.add_argument("--target", metavar="T", default="ort-cpu",
                     help="latency target (default: ort-cpu)")
    com.add_argument("--weight-bits", metavar="B", type=int, default=8, help="2..8 (default 8)")
    com.add_argument("--act-bits", metavar="B", type=int, default=8,
                     help="2..8, or 32 for float activations (default 8)")
    com.add_argument("--first-last-bits", metavar="B", type=int, default=8,
                     help="bits of the first and last layer, 2..8, or 0 to treat them like the "
                          "rest (default 8)")
    com.add_argument("--weight-range", choices=opts.WEIGHT_RANGES, default="auto",
                     help="8-bit weight grid: full int8, or 'reduced' to a 7-bit magnitude so x86 CPUs "
                          "without VNNI do not saturate; 'auto' decides from this machine (default)")
    com.add_argument("--no-smooth", dest="smooth", action="store_false",
                     help="do not move outlier channels of linear layers' inputs into their weights "
                          "(smooth_activations; on by default where it lowers the quantized error)")
    com.add_argument("--no-bias-correction", dest="bias_correction", action="store_false",
                     help="skip the per-channel correction of the output shift weight rounding causes")
    com.add_argument("--budget-ms", metavar="X", type=float,
                     help="mixed precision: latency budget in milliseconds on --target at --batch; "
                          "fxq picks every layer's precision to meet it with the least quality loss")
    com.add_argument("--bits", metavar="LIST",
                     help="mixed precision: integer bit-widths the search may use, e.g. 2,4,8 (the "
                          "target's float precision is always allowed where it runs one; default: the "
                          "target's own set)")
    com.add_argument("--pin", metavar="NAME=BITS", action="append", default=[],
                     help="mixed precision: fix layers (glob on layer names) at BITS or float; repeatable")
    com.add_argument("--search", choices=opts.SEARCHES, default="ga",
                     help="mixed precision solver: genetic algorithm (default; checked against the exact "
                          "optimum in the report) or exact dynamic programming")
    com.add_argument("--budget-check-rounds", metavar="N", type=int, default=3,
                     help="mixed precision on ort-cpu: time the chosen assignment against the uniform "
                          "models and tighten the search while it measures over budget, at most N "
                          "timings (default 3; 0 trusts the cost tables)")
    com.add_argument("--batch", metavar="N", type=int, default=1,
                     help="batch size the latency budget refers to (default 1)")
    com.add_argument("--latency-table", metavar="FILE",
                     help="mixed precision: per-layer times from trtexec --exportProfile instead of the "
                          "target's cost model")
    com.add_argument("--method", choices=opts.METHODS, default="rtn")
    com.add_argument("--loss", choices=opts.LOSSES, default="mse")
    com.add_argument("--iters", metavar="N", type=int, help="reconstruction iterations per region")
    com.add_argument("--preset", choices=opts.PRESETS, default="fast",
                     help="reconstruction budget: fast (CPU-sized, default) or paper (20k iterations)")
    com.add_argument("--tuning", choices=opts.TUNINGS, default="joint",
                     help="reconstruction: learn rounding and activation steps together (joint) or "
                          "rounding first with activations float, then steps (two-stage)")
    com.add_argument("--drop-prob", metavar="P", type=float, default=0.5,
                     help="--method qdrop: probability an activation stays float while training (default 0.5)")
    com.add_argument("--device", default="auto",
                     help="where reconstruction trains: auto (a CUDA GPU when PyTorch sees one, else the "
                          "CPU), cpu, cuda or cuda:N; everything else runs on the CPU")
    com.add_argument("--seed", metavar="S", type=int, default=0)
    com.add_argument("--calib-size", metavar="N", type=int, help="use the first N calibration samples")
    com.add_argument("--preprocess", choices=opts.PREPROCESS, default="imagenet",
                     help="image preprocessing for image folders (default imagenet)")
    com.add_argument("--print-diff", action="store_true", help="print each pass's graph diff")
    com.add_argument("--print-summary", action="store_true",
                     help="print one line per pass: its op-count changes")
    com.add_argument("--print-after", metavar="PASS", action="append", default=[],
                     help="print the graph after PASS (repeatable)")
    com.add_argument("--resume", action="store_true",
                     help="continue an interrupted reconstruction from OUT's checkpoint (same arguments)")
    com.set_defaults(func=cmd_compile)
    return parser


# --------------------------------------------------------------------------- validation


def _bits(value: int, flag: str, allowed: Sequence[int], text: str) -> int:
    if value not in allowed:
        raise UsageError(f"{flag} {value} is not supported.", f"Use {text}.")
    return value


def _parse_bits_list(text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() for p in parts):
        raise UsageError(f"--bits '{text}' is not a list of bit-widths.",
                         "Write comma-separated integers between 2 and 8, e.g. --bits 2,4,8.")
    values = sorted({int(p) for p in parts})
    bad = [v for v in values if not 2 <= v <= 8]
    if bad:
        raise UsageError(f"--bits has unsupported width(s) {', '.join(map(str, bad))}.",
                         "Every width must be between 2 and 8, e.g. --bits 2,4,8.")
    return tuple(values)


def _check_target(target: str) -> None:
    known = getattr(opts, "TARGETS", None)
    if target.lower().endswith(".json"):
        if not Path(target).is_file():
            raise UsageError(f"--target profile '{target}' does not exist.",
                             "Give the JSON written by trtexec --exportProfile, or a target name.")
        return
    if known is None or target in known:
        return
    import difflib

    close = difflib.get_close_matches(target, list(known), n=3)
    hint = f"Did you mean {', '.join(close)}? " if close else ""
    raise UsageError(f"Unknown --target '{target}'.",
                     f"{hint}Known targets: {', '.join(known)}; or a trtexec --exportProfile JSON file.")


def build_options(args: argparse.Namespace) -> opts.CompileOptions:
    """Check every compile option (cheaply: nothing heavy is loaded) and fill CompileOptions."""
    from .loading import parse_input_shape

    _bits(args.weight_bits, "--weight-bits", range(2, 9), "an integer between 2 and 8")
    _bits(args.act_bits, "--act-bits", (*range(2, 9), 32),
          "an integer between 2 and 8, or 32 for float activations")
    _bits(args.first_last_bits, "--first-last-bits", (0, *range(2, 9)),
          "an integer between 2 and 8, or 0 for no exception")
    bits = _parse_bits_list(args.bits) if args.bits is not None else None
    if args.budget_ms is not None and not (math.isfinite(args.budget_ms) and args.budget_ms > 0):
        raise UsageError(f"--budget-ms must be a positive number of milliseconds; got {args.budget_ms}.",
                         "Pass e.g. --budget-ms 5.")
    if args.iters is not None and args.iters < 1:
        raise UsageError(f"--iters must be at least 1; got {args.iters}.",
                         "Leave it out to use the preset's default.")
    if args.calib_size is not None and args.calib_size < 1:
        raise CalibrationDataError(f"--calib-size must be at least 1; got {args.calib_size}.",
                                   "Pass e.g. --calib-size 256, or leave it out to use all samples.")
    if not 0.0 <= args.drop_prob < 1.0:
        raise UsageError(f"--drop-prob must be in [0, 1); got {args.drop_prob}.",
                         "QDrop's reference value is 0.5 (the default).")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", args.device.strip().lower()):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N; got {args.device!r}.",
                         "Leave it out to use a GPU when there is one.")
    if not 0 <= args.seed < 2**32:
        raise UsageError(f"--seed must be between 0 and 2**32-1; got {args.seed}.", "Pick another seed.")
    if args.budget_check_rounds < 0:
        raise UsageError(f"--budget-check-rounds must be 0 or more; got {args.budget_check_rounds}.",
                         "The default is 2; 0 skips timing the chosen assignment.")
    if args.batch < 1:
        raise UsageError(f"--batch must be at least 1; got {args.batch}.", "The default is 1.")
    if args.budget_ms is None and (bits is not None or args.pin or args.latency_table):
        raise UsageError("--bits, --pin and --latency-table steer the mixed-precision search, which "
                         "needs a latency budget.",
                         "Add --budget-ms X (and --target T), or use --weight-bits for uniform precision.")
    if args.latency_table is not None and not Path(args.latency_table).is_file():
        raise UsageError(f"--latency-table '{args.latency_table}' does not exist.",
                         "Give the JSON written by trtexec --exportProfile.")
    from .mixed_precision import parse_pin

    pins = tuple(parse_pin(text) for text in args.pin)
    _check_target(args.target)
    parse_input_shape(args.input_shape)
    if args.weights is not None and not Path(args.weights).is_file():
        raise ModelLoadError(f"Weights file '{args.weights}' does not exist.",
                             "Check the path given to --weights; fxq never downloads weights.")
    if not Path(args.calib).exists():
        raise CalibrationDataError(f"Calibration data '{args.calib}' does not exist.",
                                   "Check the path given to --calib.")
    return opts.CompileOptions(
        out_dir=Path(args.out), backend=args.backend, target=args.target,
        weight_bits=args.weight_bits, act_bits=args.act_bits, first_last_bits=args.first_last_bits,
        method=args.method, granularity=args.granularity, loss=args.loss, iters=args.iters,
        preset=args.preset, seed=args.seed, calib_size=args.calib_size, preprocess=args.preprocess,
        bits=bits, budget_ms=args.budget_ms, batch=args.batch, search=args.search, pins=pins,
        budget_check_rounds=args.budget_check_rounds,
        latency_table=args.latency_table, print_diff=args.print_diff, print_summary=args.print_summary,
        weight_range=args.weight_range, bias_correction=args.bias_correction, smooth=args.smooth,
        print_after=tuple(args.print_after), debug=args.debug, json=args.json, resume=args.resume,
        drop_prob=args.drop_prob, tuning=args.tuning, device=args.device)


# --------------------------------------------------------------------------- commands


def _stdout() -> Console:
    return Console(highlight=False, soft_wrap=False)


def cmd_inspect(args: argparse.Namespace) -> int:
    from .loading import load_model

    loaded = load_model(args.model, weights=args.weights, input_shape=args.input_shape,
                        trust_pickle=args.trust_pickle)
    from .capture import capture

    gm = capture(loaded.module, loaded.example_inputs)
    try:
        from .backends.tables import get_backend
        from .passes.canonicalize import Canonicalize
        from .passes.detect_blocks import DetectBlocks
        from .passes.fold_batchnorm import FoldBatchNorm
        from .passes.infra import PassManager
        from .regions import regions_json, regions_table
    except ImportError as exc:
        raise FxqError("fxq inspect needs the graph passes (fxq.passes), which this installation "
                       f"lacks ({exc}).", "Reinstall fxq.") from exc
    # The same passes compile runs before block detection, so the regions (and node names)
    # shown here are the ones compile will reconstruct and report.
    passes = [Canonicalize()]
    if get_backend(opts.BACKENDS[0]).fold_batchnorm:
        passes.append(FoldBatchNorm())
    passes.append(DetectBlocks(args.granularity))
    pm = PassManager(passes, verify=args.debug)
    pm.run(gm)
    regions = pm.history[-1][1].stats.get("regions", [])
    if args.json:
        data = {"model": loaded.source, "granularity": args.granularity,
                "input_shapes": [list(s) for s in loaded.input_shapes], **regions_json(regions)}
        print(json.dumps(data, indent=2, default=str))
        return EXIT_OK
    out = _stdout()
    shapes = ", ".join("[" + ", ".join(map(str, s)) + "]" for s in loaded.input_shapes)
    out.print(Text.assemble(("model: ", "bold"), loaded.source, ("  input: ", "bold"), shapes,
                            ("  granularity: ", "bold"), args.granularity), soft_wrap=True)
    out.print(regions_table(regions))
    return EXIT_OK


def cmd_compile(args: argparse.Namespace) -> int:
    options = build_options(args)
    out_dir = options.out_dir
    # Folders this run creates (OUT and any missing parents), innermost first.
    created = [p for p in (out_dir, *out_dir.parents) if not p.exists()]
    from .atomic import deferred_commit, ensure_output_dir

    ensure_output_dir(out_dir)
    started = time.time()
    try:
        with deferred_commit(out_dir):  # OUT's files are replaced together, or not at all
            report = _run_compile(args, options)
    except BaseException:
        # Leave no trace of a run that produced nothing: drop only folders we made, if empty.
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return EXIT_OK
    written = sorted(p.name for p in out_dir.iterdir()
                     if p.is_file() and not p.name.startswith(".") and p.stat().st_mtime >= started - 1)
    out = _stdout()
    for line in _report_lines(report):
        out.print(line)
    out.print(Text.assemble(("done: ", "bold green"),
                            f"wrote {', '.join(written) or 'nothing'} to {out_dir}/"))
    return EXIT_OK


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _report_lines(report: dict) -> list[str]:
    """The few numbers a user checks after a compile (everything else is in report.json)."""
    lines = []
    v = report.get("verification") or {}
    where = "held-out" if v.get("held_out") else "calibration (too few samples to hold any out)"
    for key, label in (("onnx_vs_float", "ONNX Runtime vs float model"),
                       ("onnx_vs_fake_quant", "ONNX Runtime vs fxq fake-quant model"),
                       ("onnx_vs_integer_emulation", "ONNX Runtime vs fxq integer emulation")):
        f = v.get(key)
        if f:
            lines.append(f"{label}: top-1 agreement {_pct(f.get('top1_agreement'))}, "
                         f"max |Δ| {f['max_abs_diff']:.3g}, cosine {f['mean_cosine']:.4f} "
                         f"({v.get('holdout_samples')} {where} samples)")
    mp = report.get("mixed_precision")
    if mp:
        counts = ", ".join(f"{n} at {p}" for p, n in mp["counts"].items())
        lines.append(f"mixed precision on {mp['target']} ({mp['cost_model']} latency, batch {mp['batch']}): "
                     f"budget {mp['budget_ms']:g} ms -> predicted {mp['predicted_ms']:.3g} ms; {counts}")
        for c in mp.get("budget_checks") or []:
            lines.append(f"  budget check {c['round']}: measured {c['measured_ms']:.3g} ms, "
                         f"{c['corrected_ms']:.3g} ms on the cost model's clock (drift x{c['drift']:.3f}; "
                         f"predicted {c['predicted_ms']:.3g} ms)")
        check = mp.get("end_to_end")
        if check:
            lines.append(f"  measured {check['measured_ms']:.3g} ms end to end "
                         f"({'within' if check['within_budget'] else 'OVER'} budget; prediction error "
                         f"{check['error_pct']:+.1f} %)")
        if mp.get("exact_check"):
            lines.append(f"  predicted KL increase {mp['sensitivity']:.3g} nats ({mp['search']}; "
                         f"{mp['exact_check']['gap_pct']:.2f} % above the exact optimum); "
                         f"fastest possible {mp['fastest_ms']:.3g} ms")
        for note in mp.get("notes", [])[:1] if mp["status"] == "float" else []:
            lines.append(f"  {note}")
    lat = report.get("latency") or {}
    if lat.get("measured_ms"):
        lines.append(f"ONNX Runtime latency (batch {lat['batch']}, {lat['threads']} threads): float "
                     f"{lat['float_measured_ms']:.2f} ms -> quantized {lat['measured_ms']:.2f} ms "
                     f"({lat['speedup_vs_float']:.2f}x)")
        engine = report.get("engine") or {}
        if engine.get("latency_note"):  # an ORT CPU time says nothing about the TensorRT engine
            lines.append(f"  note: {engine['latency_note']}")
    return lines


def _run_compile(args: argparse.Namespace, options: opts.CompileOptions) -> dict:
    from .calib_data import load_calibration
    from .loading import load_model

    loaded = load_model(args.model, weights=args.weights, input_shape=args.input_shape,
                        trust_pickle=args.trust_pickle)
    if len(loaded.example_inputs) != 1:
        raise CalibrationDataError(
            f"The model takes {len(loaded.example_inputs)} inputs, but --calib provides one.",
            "fxq compile supports single-input models for now.")
    calib = load_calibration(args.calib, tuple(loaded.example_inputs[0].shape),
                             size=options.calib_size, preprocess=options.preprocess)
    try:
        from .pipeline import compile_model
    except ModuleNotFoundError as exc:
        if exc.name != "fxq.pipeline":
            raise
        raise FxqError("fxq compile is not available: the compile pipeline (fxq.pipeline) is "
                       "missing from this installation.", "Reinstall fxq.") from exc
    return compile_model(loaded, calib, options, console=getattr(args, "console", None))


# --------------------------------------------------------------------------- main


class _ConsoleLogHandler(logging.Handler):
    """Shows fxq's own log records (warnings about skipped files, progress) on stderr."""

    STYLES = {logging.WARNING: ("warning: ", "bold yellow"), logging.ERROR: ("error: ", "bold red")}

    def __init__(self, console: Console):
        super().__init__(logging.DEBUG)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
            level = max((lvl for lvl in self.STYLES if lvl <= record.levelno), default=None)
            prefix = self.STYLES.get(level, ("", ""))
            self.console.print(Text.assemble(prefix, msg))
        except Exception:  # logging must never take the command down
            self.handleError(record)


@contextlib.contextmanager
def _logging_setup(console: Console, debug: bool) -> Iterator[None]:
    fxq_log = logging.getLogger("fxq")
    saved = (fxq_log.level, fxq_log.propagate)
    handler = _ConsoleLogHandler(console)
    fxq_log.addHandler(handler)
    fxq_log.setLevel(logging.DEBUG if debug else logging.INFO)
    fxq_log.propagate = False
    quieted: list[tuple[logging.Logger, int]] = []
    with warnings.catch_warnings():
        if not debug:
            # torch warns and logs a lot during export and loading that a user cannot act on.
            warnings.simplefilter("ignore")
            for name, logger in [("torch", logging.getLogger("torch")), *[
                    (n, lg) for n, lg in logging.root.manager.loggerDict.items()
                    if n.startswith("torch.") and isinstance(lg, logging.Logger) and lg.level]]:
                quieted.append((logger, logger.level))
                logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in quieted:
                logger.setLevel(level)
            fxq_log.removeHandler(handler)
            fxq_log.setLevel(saved[0])
            fxq_log.propagate = saved[1]


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the fxq command line; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    with _logging_setup(err, debug):
        try:
            parser = build_parser()
            try:
                args = parser.parse_args(argv)
            except SystemExit as exc:  # argparse: --help/--version (0) or a usage error (2)
                return exc.code if isinstance(exc.code, int) else EXIT_USAGE
            if args.command is None:
                parser.print_help(sys.stderr)
                return EXIT_USAGE
            args.console = err
            return args.func(args)
        except FxqError as exc:
            if debug:
                traceback.print_exception(exc, file=sys.stderr)
            err.print(Text.assemble(("error: ", "bold red"), exc.message))
            return exc.exit_code
        except BrokenPipeError:
            # The reader of stdout went away (`fxq inspect m.pt --json | head`): not an error of
            # ours. Point stdout at devnull so the interpreter's final flush stays quiet too.
            with contextlib.suppress(OSError, ValueError, AttributeError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_BROKEN_PIPE
        except KeyboardInterrupt:
            err.print(Text.assemble(("interrupted", "bold red"), "; previous outputs left intact (an "
                                    "interrupted reconstruction continues with --resume)"))
            return EXIT_INTERRUPTED
        except Exception as exc:
            if debug:
                traceback.print_exception(exc, file=sys.stderr)
            err.print(Text.assemble(("internal error: ", "bold red"), _one_line(exc),
                                    "" if debug else "; rerun with --debug for the traceback"))
            return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
