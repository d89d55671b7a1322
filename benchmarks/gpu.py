"""GPU benchmark in one go: guidekit vs diffusers' guiders on real-size random-weight models.

    python benchmarks/gpu.py --out gpu-results            # on a GPU: all models, bf16 + fp32
    python benchmarks/gpu.py --tiny --out /tmp/gpu-tiny   # tiny models on CPU (< 1 min)

Models (``_gpu_models.py``): an SD3-Medium-shaped transformer at 1024 x 1024 and a
DiT-XL/2-shaped one at 256 x 256. Expressions: CFG, CFG + PAG, CFG + EMAG, CFG + EMAG-Q,
CFG + SEG, CFG + SAG. Modes: guidekit in one call per forward group (``max_rows="one call"``),
guidekit one call per branch (``max_rows=B``), and diffusers' own guider driven the way its
modular denoise loop does (one forward per condition) where diffusers has one (CFG, PAG,
SEG). Per config: the median time of a sampling step (steps 1.. of each run, step 0 left out:
diffusers' perturbation guiders never perturb it; CUDA events on a GPU), the peak memory
(``torch.cuda.max_memory_allocated``, reset per config), ratios to CFG of the same mode, and
how far one call drifts from one call per branch (one step's guided output). Every config
that fails (OOM, an error) is a row saying so. Tables are rewritten after every config, so a
run that is cut off still leaves what it measured in ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import platform
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench as bench  # noqa: E402
import _gpu_models as gm  # noqa: E402

import guidekit  # noqa: E402
from guidekit.attention import install  # noqa: E402

MODES = ("guidekit one call", "guidekit per branch", "diffusers guider")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FIELDS = ["model", "dtype", "expression", "mode", "status", "calls/step", "rows/step",
          "ms/step", "peak MiB", "above weights MiB", "time / CFG", "peak / CFG",
          "guidekit / diffusers", "note"]
DRIFT = ["model", "dtype", "expression", "status", "max abs diff", "max rel diff"]


class Clock:
    """Per-step durations: CUDA events on a GPU (read after one synchronize), else wall time."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            yield
            b.record()
            self.marks.append((a, b))
        else:
            t = time.perf_counter()
            yield
            self.marks.append(time.perf_counter() - t)

    def seconds(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in self.marks]
        return list(self.marks)


def counting(net: torch.nn.Module, log: list[int]) -> Any:
    """A hook appending the rows of every forward of ``net`` (remove the returned handle)."""
    return net.register_forward_pre_hook(
        lambda _m, a, kw: log.append(int((a[0] if a else kw["hidden_states"]).shape[0])),
        with_kwargs=True,
    )


def peer_predict(guider: Any, fn: Callable[..., torch.Tensor], net: torch.nn.Module,
                 cond: dict[str, Any], uncond: dict[str, Any], steps: int) -> Any:
    """One step of diffusers' modular denoise loop around ``guider``: it chooses the
    batches, each is one forward (its hooks in and out around it), then it combines."""

    def predict(i: int, x: torch.Tensor, s: float) -> torch.Tensor:
        guider.set_state(step=i, num_inference_steps=steps, timestep=torch.tensor(s))
        data = {"x": (x, x), **{k: (cond[k], uncond[k]) for k in cond}}
        batches = guider.prepare_inputs(data)
        rows = torch.full((x.shape[0],), s, device=x.device, dtype=x.dtype)
        for batch in batches:
            guider.prepare_models(net)
            try:
                batch.noise_pred = fn(batch.x, rows, **{k: getattr(batch, k) for k in cond})
            finally:
                guider.cleanup_models(net)
        return guider(batches).pred

    return predict


def run_config(
    predict: Callable[[int, torch.Tensor, float], torch.Tensor], reset: Callable[[], None],
    net: torch.nn.Module, x0: torch.Tensor, sigmas: list[float], repeats: int,
) -> dict[str, Any]:
    """Warm-up run (counting the calls of steps 1..), then ``repeats`` timed runs; median step time, peak."""
    device = x0.device
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    log: list[int] = []
    clock = Clock(device)
    for r in range(1 + repeats):
        reset()
        x = x0
        handle = counting(net, log) if r == 0 else None
        try:
            for i, (s, s_next) in enumerate(zip(sigmas, [*sigmas[1:], 0.0])):
                if r == 0 and i == 1:
                    del log[:]  # calls of steps 1.. only, as timed (step 0 can differ)
                with clock.step():
                    x = x + (s_next - s) * predict(i, x, s)
        finally:
            if handle is not None:
                handle.remove()
        if r == 0:
            clock.seconds()
            clock.marks.clear()
    times = clock.seconds()
    n = len(sigmas)
    steady = [t for k, t in enumerate(times) if k % n != 0]
    if not bool(torch.isfinite(x).all()):
        raise FloatingPointError("the sample is not finite")
    out = {"ms": bench.median(steady) * 1e3, "calls": len(log) / (n - 1),
           "rows": sum(log) / (n - 1)}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
        out["peak"], out["above"] = peak / 2**20, (peak - base) / 2**20
    return out


def guidekit_predict(
    spec: gm.Spec, expr: Any, fn: Callable[..., Any], cond: Any, uncond: Any,
    sigmas: list[float], max_rows: int | str | None, stack: contextlib.ExitStack, net: Any,
) -> tuple[Any, Any]:
    plan = guidekit.compile(expr, prediction=spec.prediction, noise=spec.noise, max_rows=max_rows)
    around = None
    if any(b.perturbation is not None for b in plan.branches):
        around = stack.enter_context(install(net, plan))
    guided = guidekit.guide(plan, fn, cond=cond, uncond=uncond, sigmas=sigmas, around_call=around)

    def predict(i: int, x: torch.Tensor, s: float) -> torch.Tensor:
        return guided(x, s)

    return predict, guided


def probe(predict: Callable[..., torch.Tensor], x0: torch.Tensor, sigmas: list[float]) -> Any:
    """The guided output of step 1 at ``x0`` (after step 0 at ``x0``, so EMAG has averages)."""
    predict(0, x0, sigmas[0])
    return predict(1, x0, sigmas[1]).double()


def fmt(v: Any, digits: str = ".2f") -> str:
    return "" if v is None else f"{v:{digits}}"


class Tables:
    """The rows measured so far, written to ``out`` (CSV and markdown) after every config."""

    def __init__(self, out: Path, header: list[str]) -> None:
        self.out, self.header = out, header
        self.rows: list[dict[str, Any]] = []
        self.drift: list[dict[str, Any]] = []
        out.mkdir(parents=True, exist_ok=True)

    def ratios(self) -> None:
        for r in self.rows:
            key = (r["model"], r["dtype"], r["mode"])
            cfg = next((c for c in self.rows if (c["model"], c["dtype"], c["mode"]) == key
                        and c["expression"] == "CFG" and c["status"] == "ok"), None)
            peer = next((c for c in self.rows if c["mode"] == "diffusers guider"
                         and c["status"] == "ok" and all(c[k] == r[k] for k in
                         ("model", "dtype", "expression"))), None)
            ok = r["status"] == "ok"
            r["time / CFG"] = r["ms"] / cfg["ms"] if ok and cfg else None
            r["peak / CFG"] = (r["peak"] / cfg["peak"] if ok and cfg and r.get("peak") else None)
            r["guidekit / diffusers"] = (r["ms"] / peer["ms"] if ok and peer
                                         and r["mode"] != "diffusers guider" else None)

    def write(self) -> None:
        self.ratios()
        cells = [[r["model"], r["dtype"], r["expression"], r["mode"], r["status"],
                  fmt(r.get("calls"), ".0f"), fmt(r.get("rows"), ".0f"), fmt(r.get("ms")),
                  fmt(r.get("peak"), ".0f"), fmt(r.get("above"), ".0f"),
                  fmt(r["time / CFG"]), fmt(r["peak / CFG"]), fmt(r["guidekit / diffusers"]),
                  r.get("note", "")] for r in self.rows]
        drift = [[d["model"], d["dtype"], d["expression"], d["status"],
                  fmt(d.get("abs"), ".2e"), fmt(d.get("rel"), ".2e")] for d in self.drift]
        for name, head, body in (("results", FIELDS, cells), ("drift", DRIFT, drift)):
            with open(self.out / f"{name}.csv", "w", newline="") as f:
                csv.writer(f).writerows([head, *body])
        text = ["# GPU benchmark (benchmarks/gpu.py)", "", *(f"{h}  " for h in self.header), "",
                "## Time and memory per step", "", bench.markdown(FIELDS, cells), "",
                "## Drift: one call vs one call per branch (step 1's guided output)", "",
                bench.markdown(DRIFT, drift), ""]
        (self.out / "results.md").write_text("\n".join(text))


def failure(err: BaseException) -> str:
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return "OOM: " + str(err).splitlines()[0][:160]
    return f"failed: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"


def bench_model(spec: gm.Spec, args: argparse.Namespace, device: torch.device,
                tables: Tables) -> None:
    with torch.device(device):  # initialise the weights where they run (2B on SD3)
        net = spec.build().to(device)
    fn = spec.fn(net)
    sigmas = spec.sigmas(args.steps)
    b = args.batch
    for dname in args.dtype:
        dtype = DTYPES[dname]
        net.to(dtype)
        g = torch.Generator(device=device).manual_seed(0)
        x0 = torch.randn(b, *spec.latent, generator=g, device=device, dtype=dtype) * sigmas[0]
        cond, uncond = spec.conds(b, device, dtype, g)
        for ename, expr in gm.expressions(spec).items():
            outs: dict[str, Any] = {}
            for mode in MODES:
                row: dict[str, Any] = {"model": spec.name, "dtype": dname, "expression": ename,
                                       "mode": mode}
                try:
                    with torch.inference_mode(), contextlib.ExitStack() as stack:
                        if mode == "diffusers guider":
                            guider = gm.peer_guider(spec, ename)
                            if guider is None:
                                row["status"] = "n/a"
                                row["note"] = "diffusers has no guider for this expression"
                                continue
                            predict = peer_predict(guider, fn, net, cond, uncond, len(sigmas))
                            reset: Callable[[], None] = lambda: None  # noqa: E731
                        else:
                            max_rows = "one call" if mode == "guidekit one call" else b
                            predict, guided = guidekit_predict(
                                spec, expr, fn, cond, uncond, sigmas, max_rows, stack, net)
                            reset = guided.reset
                            outs[mode] = probe(predict, x0, sigmas)
                            reset()
                        row.update(run_config(predict, reset, net, x0, sigmas, args.repeats))
                        row["status"] = "ok"
                        if ename == "CFG + SEG" and mode == "diffusers guider":
                            row["note"] = "its hooks never install (docs/peers): unblurred pass"
                except Exception as err:  # noqa: BLE001 -- recorded in the table, never lost
                    row["status"] = failure(err)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                finally:
                    tables.rows.append(row)
                    tables.write()
                    print(f"{spec.name} {dname} {ename:14} {mode:20} {row['status']:5} "
                          f"{fmt(row.get('ms'))} ms/step", flush=True)
            tables.drift.append(drift_row(spec.name, dname, ename, outs))
            tables.write()
    del net, fn
    if device.type == "cuda":
        torch.cuda.empty_cache()


def drift_row(model: str, dtype: str, expression: str, outs: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"model": model, "dtype": dtype, "expression": expression}
    one, split = outs.get("guidekit one call"), outs.get("guidekit per branch")
    if one is None or split is None:
        row["status"] = "n/a: a guidekit mode failed"
        return row
    diff = float((one - split).abs().max())
    row.update(status="ok", abs=diff, rel=diff / (float(split.abs().max()) or 1.0))
    if not (math.isfinite(row["abs"]) and math.isfinite(row["rel"])):
        row["status"] = "not finite"
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--models", nargs="+", choices=["sd3", "dit"], default=["sd3", "dit"])
    p.add_argument("--steps", type=int, default=4, help="steps per timed run (>= 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per config (+1 warm-up)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--out", required=True, help="folder for results.md, results.csv, drift.csv")
    p.add_argument("--tiny", action="store_true", help="tiny models (2 layers, 8 x 8 latents)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args()
    if args.steps < 2:
        p.error("--steps must be >= 2 (step 0 is left out of the timing)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # the guiders' "experimental" banner per config
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)")
    header = [f"device: {where}; torch {torch.__version__}; diffusers {diffusers.__version__}; "
              f"guidekit {guidekit.__version__}",
              f"models: {'TINY ' if args.tiny else ''}{', '.join(args.models)}; dtypes "
              f"{', '.join(args.dtype)}; batch {args.batch}; {args.steps} steps per run, "
              f"{args.repeats} timed runs + 1 warm-up; ms/step = median over steps 1..",
              f"command: python benchmarks/gpu.py {' '.join(sys.argv[1:])}"]
    print("\n".join(header), flush=True)
    tables = Tables(Path(args.out), header)
    started = time.perf_counter()
    for name in args.models:
        spec = gm.specs(args.tiny)[name]
        try:
            bench_model(spec, args, device, tables)
        except Exception as err:  # noqa: BLE001 -- e.g. the model does not fit: say so
            tables.rows.append({"model": name, "dtype": "all", "expression": "all",
                                "mode": "all", "status": failure(err)})
            tables.write()
            print(f"{name}: {failure(err)}", flush=True)
    tables.header.append(f"took {time.perf_counter() - started:.0f} s")
    tables.write()
    print(f"wrote {Path(args.out) / 'results.md'} (+ results.csv, drift.csv)")


if __name__ == "__main__":
    main()
