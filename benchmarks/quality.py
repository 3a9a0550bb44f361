"""Quality benchmark: every quantization method at every bit setting, side by side, per model.

    .venv/bin/python benchmarks/quality.py [--models lite0,digits-resnet,digits-mbv2,digits-vit,minilm]
        [--settings W4A32,W3A32,W2A32,W4A8,W4A4,W2A4] [--methods rtn,adaround,brecq,brecq-fisher,qdrop]
        [--calib 256] [--eval 1000] [--iters N] [--preset fast] [--out bench-out/quality]
        [--resume-rows] [--md docs/quality.md] [--threads N]

For each model the float model is captured once and its outputs on the evaluation set computed
once; then every (setting, method) row is one ``fxq.pipeline.compile_model`` call (``holdout=0``:
all calibration samples calibrate) and the compiled ``model.onnx`` is evaluated in ONNX Runtime.
"WxAy" is x-bit weights, y-bit activations (A32 = float activations, weight-only); the first conv
and the last linear keep fxq's default ``first_last_bits`` (8).

Models and metrics:

- ``lite0``: EfficientNet-Lite0 with its ImageNet weights; calibration ``photo_crops("calib", N,
  seed=0)``, evaluation ``photo_crops("eval", N, seed=1)`` (disjoint photos). Metrics against the
  float model: top-1 agreement, float top-1 within the quantized top-5, mean KL(float || quant).
- ``digits-resnet``, ``digits-mbv2``: the small CNNs of ``fxq.examples.digits`` (trained on first
  use, then cached); calibration from the training split, metric: accuracy on the test split
  (its first ``--eval`` images, at most all 597).
- ``digits-vit`` (not in the default set): torchvision's ``VisionTransformer`` trained on the
  digits (``fxq.examples.vit_digits``), same data and metric.
- ``minilm`` (not in the default set; needs ``fxq[transformers]``): the pretrained sentence
  encoder all-MiniLM-L6-v2 (``fxq.examples.minilm``); calibration and evaluation sentences from
  disjoint standard-library modules' docstrings; metrics against the float model: mean cosine
  similarity of the embeddings and nearest-neighbour agreement (see docs/transformers.md).

Methods: rtn, adaround (layer-wise), brecq (block-wise, MSE), brecq-fisher (Fisher-weighted
loss), qdrop. A method the installed fxq does not implement raises ``FxqError``; its row is
recorded as "n/a (reason)" and the run goes on.

Every finished row is appended to ``OUT/results.jsonl`` at once, and ``OUT/quality.md`` is
rewritten after every row (one table per model: rows = methods, columns = settings, each cell
"quality (compile time)"). ``--resume-rows`` keeps the rows already in ``results.jsonl`` (same
model, setting, method, calibration/evaluation sizes, iterations and preset) and skips them;
without it an existing ``results.jsonl`` is moved to ``results.prev.jsonl``.

Threads: unless ``OMP_WAIT_POLICY`` is already set, this script sets it to ``PASSIVE`` before
torch loads. On a 2-core machine shared with another busy process, OpenMP's default spin-waiting
made the small ops of a compile 10-25x slower (fxq's bias correction of a digits model: 17 s vs
0.8 s). The setting, the thread count and the load average are recorded with every row.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch (and its OpenMP runtime) loads

import argparse  # noqa: E402
import copy  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from fxq.errors import FxqError  # noqa: E402
from fxq.options import CompileOptions  # noqa: E402
from fxq.pipeline import compile_model, fidelity, run_onnx  # noqa: E402

MODELS = ("lite0", "digits-resnet", "digits-mbv2", "digits-vit", "minilm")
DEFAULT_MODELS = ("lite0", "digits-resnet", "digits-mbv2")
DEFAULT_SETTINGS = ("W4A32", "W3A32", "W2A32", "W4A8", "W4A4", "W2A4")
# method label -> CompileOptions fields
METHODS = {
    "rtn": {"method": "rtn"},
    "gptq": {"method": "gptq"},
    "adaround": {"method": "adaround"},
    "brecq": {"method": "brecq", "loss": "mse"},
    "brecq-fisher": {"method": "brecq", "loss": "fisher"},
    "qdrop": {"method": "qdrop", "loss": "mse"},
    # not in the default set: the tuning-order comparison (joint is fxq's default)
    "brecq-2stage": {"method": "brecq", "loss": "mse", "tuning": "two-stage"},
}
FLOAT = "float"


def parse_setting(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"W(\d+)A(\d+)", text.strip(), flags=re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"setting {text!r} is not of the form W4A8")
    w, a = int(m.group(1)), int(m.group(2))
    if not (1 <= w <= 8) or not (1 <= a <= 8 or a == 32):
        raise argparse.ArgumentTypeError(f"setting {text!r}: weight bits 1..8, activation bits 1..8 or 32")
    return w, a


def _csv(choices=None):
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if choices is not None:
            bad = [t for t in items if t not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(choices)}")
        return items
    return parse


# --- models -------------------------------------------------------------------------------------

class Bench:
    """One model: its float reference and how to score an ONNX model against it."""

    name: str
    metric_note: str

    def __init__(self, module, example, calib, eval_x):
        from fxq.calibrate import run_batched
        from fxq.capture import capture

        self.module, self.example, self.calib, self.eval_x = module, example, calib, eval_x
        float_gm = capture(module, example)
        self.float_out = run_batched(float_gm, eval_x)
        from fxq.backends.lower_qdq import lower_qdq

        self.float_onnx = lower_qdq(copy.deepcopy(float_gm), quantized=False).SerializeToString()
        self.batch = int(example[0].shape[0])

    def evaluate(self, onnx_bytes: bytes) -> dict:
        return self.score(run_onnx(onnx_bytes, self.eval_x, self.batch))

    def score(self, logits: torch.Tensor) -> dict:
        f = fidelity(self.float_out, logits)
        top5 = logits.topk(5, 1).indices
        return {"top1_agreement": f["top1_agreement"], "mean_kl": f["mean_kl"],
                "top5": float((top5 == self.float_out.argmax(1, keepdim=True)).any(1).float().mean())}

    def cell(self, metrics: dict) -> str:
        return f"{metrics['top1_agreement']:.1%} / {max(metrics['mean_kl'], 0.0):.3f}"


class Lite0Bench(Bench):
    name = "lite0"
    metric_note = ("top-1 agreement with the float model / mean KL(float ‖ quant) on the eval "
                   "crops (float top-1 within the quantized top-5 is in results.jsonl)")

    def __init__(self, n_calib: int, n_eval: int):
        from fxq.examples.efficientnet_lite0 import INPUT_SHAPE, efficientnet_lite0
        from fxq.examples.photos import photo_crops

        super().__init__(efficientnet_lite0(pretrained=True), (torch.zeros(INPUT_SHAPE),),
                         photo_crops("calib", n_calib, seed=0), photo_crops("eval", n_eval, seed=1))
        self.data_note = (f"{n_calib} calibration crops (calib photos, seed 0), {n_eval} evaluation "
                          f"crops (eval photos, seed 1)")


class DigitsBench(Bench):
    metric_note = "accuracy on the digits test split"

    def __init__(self, name: str, arch: str, n_calib: int, n_eval: int):
        from fxq.examples import digits

        self.name = name
        splits = digits.digits_splits()
        n_eval = min(n_eval, splits["test_x"].shape[0])
        self.labels = splits["test_y"][:n_eval]
        self._accuracy = digits.accuracy
        super().__init__(digits.trained_digits_model(arch), (torch.zeros(digits.INPUT_SHAPE),),
                         digits.calib_samples(n_calib, seed=0), splits["test_x"][:n_eval])
        self.data_note = (f"{n_calib} calibration images from the training split, {n_eval} test "
                          f"images; model `fxq.examples.digits` {arch}")

    def score(self, logits: torch.Tensor) -> dict:
        out = super().score(logits)
        out["accuracy"] = self._accuracy(logits, self.labels)
        return out

    def cell(self, metrics: dict) -> str:
        return f"{metrics['accuracy']:.1%}"


class ViTDigitsBench(DigitsBench):
    """torchvision's VisionTransformer trained on the digits (``fxq.examples.vit_digits``)."""

    def __init__(self, n_calib: int, n_eval: int):
        from fxq.examples import digits, vit_digits

        self.name = "digits-vit"
        splits = digits.digits_splits()
        n_eval = min(n_eval, splits["test_x"].shape[0])
        self.labels = splits["test_y"][:n_eval]
        self._accuracy = digits.accuracy
        Bench.__init__(self, vit_digits.trained_vit_digits(), (torch.zeros(vit_digits.INPUT_SHAPE),),
                       digits.calib_samples(n_calib, seed=0), splits["test_x"][:n_eval])
        self.data_note = (f"{n_calib} calibration images from the training split, {n_eval} test images; "
                          f"model `fxq.examples.vit_digits` (4 pre-norm encoder layers, hidden 64, 4 heads, "
                          f"64 patches)")


class MiniLMBench(Bench):
    """all-MiniLM-L6-v2 (``fxq.examples.minilm``) on standard-library docstring sentences."""

    name = "minilm"
    metric_note = ("mean cosine similarity of the sentence embeddings to the float model's / "
                   "nearest-neighbour agreement (each evaluation sentence's nearest other sentence, "
                   "float vs quantized embeddings)")

    def __init__(self, n_calib: int, n_eval: int):
        from fxq.examples import minilm
        from fxq.examples.text_corpus import stdlib_sentences

        self._metrics = minilm.similarity_metrics
        n_eval = min(n_eval, len(stdlib_sentences("eval")))
        calib = minilm.tokenize(stdlib_sentences("calib", n_calib, seed=0))
        evals = minilm.tokenize(stdlib_sentences("eval", n_eval, seed=0))
        super().__init__(minilm.sentence_encoder(), (calib[:minilm.BATCH],), calib, evals)
        self.data_note = (f"{n_calib} calibration sentences, {n_eval} evaluation sentences from disjoint "
                          f"standard-library modules' docstrings (`fxq.examples.text_corpus`), "
                          f"{minilm.SEQ_LEN} tokens each")

    def score(self, embeddings: torch.Tensor) -> dict:
        return self._metrics(self.float_out, embeddings)

    def cell(self, metrics: dict) -> str:
        return f"{metrics['mean_cosine']:.4f} / {metrics['nn_agreement']:.1%}"


def load_bench(name: str, n_calib: int, n_eval: int) -> Bench:
    if name == "lite0":
        return Lite0Bench(n_calib, n_eval)
    if name == "digits-resnet":
        return DigitsBench(name, "resnet", n_calib, n_eval)
    if name == "digits-mbv2":
        return DigitsBench(name, "mobilenetv2", n_calib, n_eval)
    if name == "digits-vit":
        return ViTDigitsBench(n_calib, n_eval)
    if name == "minilm":
        return MiniLMBench(n_calib, n_eval)
    raise ValueError(name)


# --- rows ---------------------------------------------------------------------------------------

def row_key(row: dict) -> tuple:
    return (row["model"], row["setting"], row["method"], row["calib"], row["eval"], row.get("iters"),
            row.get("preset"))


def load_rows(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill: drop it, the row reruns
                continue
    return rows


def append_row(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def cell_text(row: dict | None, bench_cell) -> str:
    if row is None:
        return ""
    if row["status"] == "n/a":
        return f"n/a ({row['reason']})"
    if row["status"] == "error":
        return f"error ({row['reason']})"
    text = bench_cell(row["metrics"])
    if row.get("compile_s") is not None:
        text += f" ({row['compile_s']:.0f} s)"
    return text


def _short(reason: str, limit: int = 90) -> str:
    reason = " ".join(reason.split())
    return reason if len(reason) <= limit else reason[:limit - 1] + "…"


def markdown(rows: list[dict], models: list[str], settings: list[str], methods: list[str],
             notes: dict[str, str], cells: dict, meta: dict) -> str:
    latest: dict[tuple, dict] = {}
    for r in rows:
        latest[(r["model"], r["setting"], r["method"])] = r
    lines = ["# Quality benchmark", "",
             f"`benchmarks/quality.py`, {meta['when']}. Each cell: quality (wall time of the "
             f"`compile_model` call: passes, calibration, reconstruction, lowering, verification, "
             f"writing). Reconstruction iterations: {meta['iters']}; preset {meta['preset']}. "
             f"Machine: {meta['machine']}.", ""]
    for model in models:
        bench_cell = cells.get(model)
        if bench_cell is None:
            continue
        lines += [f"## {model}", "", notes.get(model, ""), "",
                  "| method | " + " | ".join(settings) + " |",
                  "|---|" + "---|" * len(settings)]
        f = latest.get((model, FLOAT, FLOAT))
        if f is not None:
            lines.append("| float (ONNX) | " + " | ".join(cell_text(f, bench_cell) for _ in settings) + " |")
        for method in methods:
            lines.append(f"| {method} | " + " | ".join(
                cell_text(latest.get((model, s, method)), bench_cell) for s in settings) + " |")
        lines.append("")
    return "\n".join(lines)


def machine_info(threads: int) -> str:
    try:
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    return (f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__} with {threads} "
            f"intra-op threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')}, "
            f"load average at start {load}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=_csv(MODELS), default=list(DEFAULT_MODELS))
    ap.add_argument("--settings", type=_csv(), default=list(DEFAULT_SETTINGS))
    ap.add_argument("--methods", type=_csv(tuple(METHODS)), default=[m for m in METHODS if m not in ("brecq-2stage", "gptq")])
    ap.add_argument("--calib", type=int, default=256, help="calibration samples (all calibrate: holdout 0)")
    ap.add_argument("--eval", type=int, default=1000, help="evaluation samples (digits: at most the 597 test images)")
    ap.add_argument("--iters", type=int, default=None, help="reconstruction steps per region (default: the preset's)")
    ap.add_argument("--preset", choices=("fast", "paper"), default="fast")
    ap.add_argument("--out", default="bench-out/quality")
    ap.add_argument("--resume-rows", action="store_true", help="skip rows already in OUT/results.jsonl")
    ap.add_argument("--md", default=None, help="also copy the final markdown tables to this path")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args(argv)
    for s in args.settings:
        try:
            parse_setting(s)
        except argparse.ArgumentTypeError as exc:
            ap.error(str(exc))
    settings = [s.upper() for s in args.settings]
    if args.threads:
        torch.set_num_threads(args.threads)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "results.jsonl"
    if args.resume_rows:
        rows = load_rows(jsonl)
    else:
        if jsonl.exists():
            os.replace(jsonl, out / "results.prev.jsonl")
        rows = []
    meta = {"when": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "iters": args.iters if args.iters is not None else "preset default",
            "preset": args.preset, "machine": machine_info(torch.get_num_threads())}
    common = {"calib": args.calib, "eval": args.eval, "iters": args.iters, "preset": args.preset}
    done = {row_key(r) for r in rows if r.get("status") == "ok"}
    notes: dict[str, str] = {}
    cells: dict = {}
    failures = 0
    total = len(args.models) * (1 + len(settings) * len(args.methods))
    counter = 0

    def write_md() -> str:
        same = [r for r in rows if all(r.get(k) == v for k, v in common.items())]
        text = markdown(same, args.models, settings, args.methods, notes, cells, meta)
        tmp = out / "quality.md.tmp"
        tmp.write_text(text + "\n")
        os.replace(tmp, out / "quality.md")
        return text

    def record(row: dict) -> None:
        rows.append(row)
        append_row(jsonl, row)
        write_md()

    for model in args.models:
        t0 = time.perf_counter()
        bench = load_bench(model, args.calib, args.eval)
        eval_n = int(bench.eval_x.shape[0])
        notes[model] = f"Quality: {bench.metric_note}. Data: {bench.data_note}."
        cells[model] = bench.cell
        print(f"{model}: float model captured and evaluated on {eval_n} samples in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        base = {"model": model, **common, "eval_samples": eval_n, "machine": meta["machine"]}
        counter += 1
        frow = {**base, "setting": FLOAT, "method": FLOAT, "status": "ok", "reason": None,
                "metrics": bench.evaluate(bench.float_onnx), "compile_s": None}
        if row_key(frow) not in done:
            record(frow)
        print(f"[{counter}/{total}] {model} float (ONNX): {cell_text(frow, bench.cell)}", flush=True)
        for setting in settings:
            w, a = parse_setting(setting)
            for method in args.methods:
                counter += 1
                row = {**base, "setting": setting, "method": method, "weight_bits": w, "act_bits": a}
                if row_key(row) in done:
                    print(f"[{counter}/{total}] {model} {setting} {method}: already in {jsonl}", flush=True)
                    continue
                opts = CompileOptions(out_dir=out / model / f"{setting}-{method}", weight_bits=w, act_bits=a,
                                      holdout=0, seed=0, iters=args.iters, preset=args.preset,
                                      **METHODS[method])
                t1 = time.perf_counter()
                try:
                    report = compile_model((bench.module, bench.example), bench.calib, opts)
                    compile_s = time.perf_counter() - t1
                    onnx_bytes = (Path(opts.out_dir) / "model.onnx").read_bytes()
                    row.update(status="ok", reason=None, metrics=bench.evaluate(onnx_bytes),
                               compile_s=round(compile_s, 2), timings_s=report.get("timings_s"),
                               weight_range=(report.get("weight_range") or {}).get("why"))
                except FxqError as exc:
                    row.update(status="n/a", reason=_short(exc.what), compile_s=None)
                except Exception as exc:  # keep a long run going; the row says what broke
                    failures += 1
                    traceback.print_exc()
                    row.update(status="error", reason=_short(f"{type(exc).__name__}: {exc}"), compile_s=None)
                record(row)
                print(f"[{counter}/{total}] {model} {setting} {method}: {cell_text(row, bench.cell)}", flush=True)
        del bench

    text = write_md()
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "quality.md", args.md)
    print()
    print(text)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
