"""Device check on one CUDA GPU (not collected by pytest; run by hand on a GPU machine).

    python tests/distributed/gpu_check.py all MODEL_DIR TASK_DIR OUT_DIR

MODEL_DIR/TASK_DIR are the tiny assets of tests/faults/tiny_run.py. Writes OUT_DIR/report.json:
a BLoB run on the GPU, the same run killed after step 5 and resumed (bitwise or not), a bf16
run, the GPU checkpoint resumed on the CPU, and what an FSDP2 launch on the one GPU does
(trains; FSDP1 is refused).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
from safetensors.torch import load_file


def _cfg(model: str, task: str, out: Path, **kw):
    from blob_lora.training import TrainConfig

    base = dict(
        model=model, task=task, out=str(out), method="blob", batch_size=4, max_steps=6,
        checkpoint_every=1, max_length=64, target_modules=["q_proj", "v_proj"], lr=1e-2,
        evaluate=False, seed=3,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _killed_copy(src: Path, dst: Path, step: int) -> None:
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "adapter")
    for p in (dst / "checkpoints").glob("step-*"):
        if int(p.name[5:]) > step:
            shutil.rmtree(p)
    (dst / "checkpoints" / "latest").write_text(f"step-{step:08d}\n")


def _step(report: dict, name: str, fn) -> None:
    start = time.perf_counter()
    try:
        report[name] = fn()
    except Exception as exc:  # record and go on: one failure must not hide the others
        report[name] = {
            "error": f"{type(exc).__name__}: {exc}",
            "tb": traceback.format_exc()[-2000:],
        }
    if isinstance(report[name], dict):
        report[name]["seconds"] = round(time.perf_counter() - start, 2)
    print(name, json.dumps(report[name])[:400], flush=True)


def run_all(model: str, task: str, out: Path) -> None:
    from blob_lora.pipeline import train

    report: dict = {
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    ref = out / "gpu"

    def reference():
        s = train(_cfg(model, task, ref), progress=False)
        rng = json.loads((ref / "checkpoints" / "step-00000006" / "rng.json").read_text())
        return {"steps": s["steps"], "cuda_rng_saved": "cuda" in json.dumps(rng)}

    def resume_gpu():
        _killed_copy(ref, out / "resumed", 3)
        train(_cfg(model, task, out / "resumed"), resume=True, progress=False)
        a, b = _adapter(ref), _adapter(out / "resumed")
        return {"bitwise": all(torch.equal(a[k], b[k]) for k in a), "max_abs_diff": _diff(a, b)}

    def resume_on_cpu():
        _killed_copy(ref, out / "on_cpu", 3)
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
        cmd = [sys.executable, __file__, "resume", model, task, str(out / "on_cpu")]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode:
            return {"error": proc.stderr[-2000:]}
        return {"max_abs_diff_vs_gpu": _diff(_adapter(ref), _adapter(out / "on_cpu"))}

    def bf16():
        s = train(_cfg(model, task, out / "bf16", dtype="bfloat16", max_steps=3), progress=False)
        log = [json.loads(x) for x in (out / "bf16" / "train_log.jsonl").read_text().splitlines()]
        return {"steps": s["steps"], "nll": [r["nll"] for r in log]}

    def evaluate():
        s = train(_cfg(model, task, out / "ev", evaluate=True, eval_samples=4), progress=False)
        m = next(iter(s["evaluations"].values()))
        return {"n_examples": m["n_examples"], "accuracy": m["accuracy"]}

    def fsdp():
        env = dict(os.environ, HF_HOME=str(out / "hf"))
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version",
            "2", "--num_processes", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            __file__, "fsdp", model, task, str(out / "fsdp"),
        ]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        lines = [x for x in (proc.stdout + proc.stderr).splitlines() if "FSDP-RESULT" in x]
        return {"returncode": proc.returncode, "result": lines, "tail": proc.stderr[-1500:]}

    for name, fn in [
        ("reference", reference),
        ("resume_gpu", resume_gpu),
        ("resume_on_cpu", resume_on_cpu),
        ("bf16", bf16),
        ("evaluate", evaluate),
        ("fsdp", fsdp),
    ]:
        _step(report, name, fn)
    (out / "report.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    mode, model, task, out = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
    if mode == "all":
        out.mkdir(parents=True, exist_ok=True)
        run_all(model, task, out)
    elif mode == "resume":
        from blob_lora.pipeline import train

        train(_cfg(model, task, out), resume=True, progress=False)
    elif mode == "fsdp":
        from blob_lora.pipeline import train
        from blob_lora.utils.errors import BlobLoraError

        try:
            train(_cfg(model, task, out), progress=False)
            print("FSDP-RESULT trained", flush=True)
        except BlobLoraError as exc:
            print(f"FSDP-RESULT refused: {exc}", flush=True)
