"""Running the ``ssprompt`` command line from tests, checking its one-line errors, and the tiny
random models the tests share.

``ssprompt(*args)`` is the one CLI runner. By default it calls ``ssprompt.cli.main(argv)`` in
this process (no interpreter start, no 3-5 s of torch / transformers imports): stdout and stderr
are captured (Python-level and file-descriptor-level), the exit code is ``main``'s return value
or a ``SystemExit``'s code (argparse: 2 for a usage error, 0 for ``--help``), an uncaught
exception prints its traceback on stderr and gives 1, as ``python -m ssprompt.cli`` would. The
global state ``main`` may touch (cwd, environment, torch threads, RNG states, warnings filters,
grad mode, default dtype, deterministic mode, ``sys.argv``, a torch.distributed group) is
restored after every call, so in-process runs do not leak into each other.

``ssprompt(*args, subprocess=True)`` runs the real ``python -m ssprompt.cli`` in a fresh process,
and ``ranks=K`` (K > 1) under ``torchrun --standalone`` with the gloo backend: for what needs a
process boundary (torchrun, worker processes, signals, import-time state). Setting the
environment variable ``SSPROMPT_TEST_SUBPROCESS=1`` sends every call through a subprocess (a
slower, full-fidelity run of the whole suite).
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import subprocess as _sp
import sys
import tempfile
import threading
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
_ONE_AT_A_TIME = threading.Lock()   # in-process runs share cwd, env and fds: never concurrent


def ssprompt(*args, subprocess: bool = False, ranks: int = 1, env: dict | None = None,
             timeout: float = 300) -> _sp.CompletedProcess:
    """``ssprompt ARGS...`` -> CompletedProcess(args, returncode, stdout, stderr).

    subprocess: run ``python -m ssprompt.cli`` in a new process (default: in this process).
    ranks: > 1 launches that many processes under torchrun (gloo; implies subprocess).
    env: extra environment variables for the run (a value None removes the variable).
    """
    argv = [str(a) for a in args]
    if subprocess or ranks > 1 or os.environ.get("SSPROMPT_TEST_SUBPROCESS") == "1":
        return _run_subprocess(argv, ranks, env or {}, timeout)
    return _run_in_process(argv, env or {})


def _child_env(extra: dict, distributed: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    if distributed:
        env.update(SSPROMPT_BACKEND="gloo", CUDA_VISIBLE_DEVICES="", PYTHONFAULTHANDLER="1")
    for k, v in extra.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = str(v)
    return env


def _run_subprocess(argv: list[str], ranks: int, extra: dict, timeout: float):
    launch = [sys.executable, "-m", "ssprompt.cli"] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc-per-node", str(ranks), "-m", "ssprompt.cli"]
    env = _child_env(extra, distributed=ranks > 1)
    for _attempt in range(3):
        r = _sp.run([*launch, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                    timeout=timeout)
        # Known flake, not ssprompt's: under load a gloo worker process occasionally dies at
        # interpreter exit with "terminate called without an active exception" (SIGABRT),
        # after its work is done. Retry that, and only that.
        if not (ranks > 1 and r.returncode
                and "terminate called without an active exception" in r.stderr):
            break
    return r


@contextlib.contextmanager
def _fd_captured(fd: int, sink: list):
    """Whatever is written to file descriptor ``fd`` (C/C++ code, child processes) goes to a
    temporary file, appended to ``sink`` afterwards."""
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(fd)
        try:
            os.dup2(tmp.fileno(), fd)
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            sink.append(tmp.read().decode("utf-8", "replace"))


@contextlib.contextmanager
def global_state_restored(extra_env: dict | None = None):
    """Run a block as if it were its own process, as far as global state goes: cwd = the
    repository root, the subprocess environment, 1 torch thread (OMP_NUM_THREADS=1 in a
    subprocess); everything is put back on exit."""
    import numpy as np
    import torch
    import torch.distributed as dist

    saved_env = dict(os.environ)
    saved_cwd = os.getcwd()
    saved_argv = sys.argv[:]
    saved = (torch.get_num_threads(), torch.get_rng_state(), random.getstate(),
             np.random.get_state(), torch.is_grad_enabled(), torch.get_default_dtype(),
             torch.are_deterministic_algorithms_enabled())
    try:
        os.environ.clear()
        os.environ.update(_child_env(extra_env or {}, distributed=False))
        os.chdir(ROOT)
        torch.set_num_threads(1)
        with warnings.catch_warnings():
            yield
    finally:
        if dist.is_available() and dist.is_initialized():   # main tears its group down itself
            dist.destroy_process_group()
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv[:] = saved_argv
        threads, rng, py_rng, np_rng, grad, dtype, determ = saved
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)
        random.setstate(py_rng)
        np.random.set_state(np_rng)
        torch.set_grad_enabled(grad)
        torch.set_default_dtype(dtype)
        torch.use_deterministic_algorithms(determ)


def _run_in_process(argv: list[str], extra: dict) -> _sp.CompletedProcess:
    from ssprompt.cli import main

    out, err = io.StringIO(), io.StringIO()
    fd_out, fd_err = [], []
    with _ONE_AT_A_TIME, global_state_restored(extra):
        sys.argv[:] = ["ssprompt", *argv]
        with _fd_captured(1, fd_out), _fd_captured(2, fd_err), \
                contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(argv)
            except SystemExit as e:        # argparse: usage error (2), --help (0)
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if not isinstance(e.code, (int, type(None))):
                    print(e.code, file=sys.stderr)
            except Exception:              # what the interpreter would print, exit 1
                traceback.print_exc()
                rc = 1
            sys.stdout.flush()
            sys.stderr.flush()
    return _sp.CompletedProcess(["ssprompt", *argv], rc, out.getvalue() + "".join(fd_out),
                                err.getvalue() + "".join(fd_err))


def assert_ok(r: _sp.CompletedProcess) -> _sp.CompletedProcess:
    assert r.returncode == 0, (r.stdout[-1500:], r.stderr[-4000:])
    return r


def shown_lines(stderr: str) -> list[str]:
    """The non-blank lines a terminal shows: text a carriage return went back over (a progress
    bar that erased itself, tqdm's ``leave=False``) is not shown; a bar left behind is."""
    return [ln.rsplit("\r", 1)[-1] for ln in stderr.split("\n")
            if ln.rsplit("\r", 1)[-1].strip()]


def assert_one_error_line(stderr: str, *needles: str, erased_ok: bool = False) -> str:
    """Exactly one non-blank stderr line, ``ssprompt: error: ...``, containing every needle.
    erased_ok: text that a carriage return went back over does not count (``shown_lines``);
    otherwise every piece between line breaks or carriage returns counts as a line."""
    lines = (shown_lines(stderr) if erased_ok
             else [ln for ln in stderr.strip().splitlines() if ln.strip()])
    assert len(lines) == 1, stderr[-2000:]
    assert lines[0].startswith("ssprompt: error:"), stderr[-2000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def assert_one_line_error(r: _sp.CompletedProcess, *needles: str, erased_ok: bool = False) -> str:
    """Exit code 2 and exactly one stderr line ``ssprompt: error: ...`` naming every needle."""
    assert r.returncode == 2, f"rc={r.returncode}\n{r.stderr[-2000:]}"
    return assert_one_error_line(r.stderr, *needles, erased_ok=erased_ok)


# ------------------------------------------------------------------------------ tiny models
def tiny_embedded(seed: int = 0):
    """A small randomly initialised, frozen embedded SFM (no committed weights needed)."""
    import torch

    from ssprompt.sfm.base import freeze
    from ssprompt.sfm.embedded import EmbeddedSFM

    torch.manual_seed(seed)
    return freeze(EmbeddedSFM(embed_dim=32, mask_dim=16, layers=1))


def save_tiny_embedded(path: Path, seed: int = 0) -> Path:
    """``tiny_embedded(seed)`` saved as safetensors, for ``--checkpoint``."""
    tiny_embedded(seed).save(path)
    return path


def tiny_sam_config():
    """A tiny SamConfig: input 64 px, image embedding 4 x 4, masks 16 x 16, hidden size 16."""
    from transformers import SamConfig

    d, size = 16, 64
    return SamConfig(
        vision_config=dict(hidden_size=32, output_channels=d, num_hidden_layers=2,
                           num_attention_heads=2, image_size=size, patch_size=16, window_size=2,
                           global_attn_indexes=[1], num_pos_feats=d // 2, mlp_dim=64),
        prompt_encoder_config=dict(hidden_size=d, image_size=size, patch_size=16,
                                   mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=d, mlp_dim=32, num_hidden_layers=2,
                                 num_attention_heads=2, iou_head_hidden_dim=16),
    )


def save_tiny_sam(path, seed: int = 0):
    """A tiny random SamModel saved with save_pretrained (a ``--sfm sam --checkpoint``)."""
    import torch
    from transformers import SamModel

    torch.manual_seed(seed)
    model = SamModel(tiny_sam_config()).eval()
    # A random init leaves SAM's IoU head near 0 (object logit pinned at the clamp): nudge its
    # output bias so the object logit is an honest, unclamped function of the prompts.
    with torch.no_grad():
        model.mask_decoder.iou_prediction_head.proj_out.bias.fill_(0.5)
    model.save_pretrained(path)
    return path
