"""Fetch, on a machine with the package registry, the wheels that a GPU machine without internet lacks.

    python scripts/gpu_wheels.py            # -> .whl/ (ignored by git), then a report of what it holds

The GPU machines lent to this project (docs/gpu.md) have Python 3.12, PyTorch 2.11, lightning 2.6,
transformers 5.x, torchmetrics, peft, PyYAML, matplotlib and tqdm, but no internet and none of the
packages in ``WHEELS`` below. This script downloads those as wheels for CPython 3.12 on manylinux x86-64
(``pip download --only-binary=:all: --no-deps``), and builds DeepSpeed into a wheel here
(``pip wheel --no-deps --no-build-isolation``): its PyPI release is a source distribution, and with
``DS_BUILD_OPS=0`` the build compiles nothing (ops are JIT-compiled on first use), so the wheel is
pure Python and installs on any platform.

On the GPU machine they are installed offline, without dependency resolution, into a separate folder put
first on ``PYTHONPATH`` (the machine's own packages stay untouched)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD

Because nothing resolves dependencies there, the check at the end reads every wheel's ``Requires-Dist``
(markers evaluated for CPython 3.12 on Linux, extras skipped) and fails if a requirement is neither in
``.whl`` nor in ``GPU_MACHINE_PACKAGES`` (the package list this workplace records for the machine).
Versions are pinned to the ones this project's CPU environment runs (the CI venv), so the GPU run uses
code that is tested here.
"""

from __future__ import annotations

import argparse
import email.parser
import os
import re
import subprocess
import sys
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name==version: what the project needs (pyproject.toml: dependencies + the deepspeed extra) that the GPU
# machine lacks, and what those need in turn. Pinned to the CPU venv's versions.
WHEELS = [
    # configs/strategy/deepspeed_zero{2,3}.yaml
    "hjson==3.1.0",
    "pydantic==2.14.4",
    "pydantic-core==2.50.5",
    "annotated-types==0.8.0",
    "typing-inspection==0.4.5",
    # pydantic needs a recent typing-extensions; the machine's version is not recorded, so ship ours
    # (installed under /tmp/site it shadows the machine's; newer releases only add names).
    "typing-extensions==4.16.0",
    # the CLI (LightningCLI with parser_mode=omegaconf) and the strategy configs' class_path parsing
    "jsonargparse==4.53.0",
    "docstring-parser==0.18.0",
    "typeshed-client==2.15.0",
    "omegaconf==2.4.0",
]
DEEPSPEED = "deepspeed==0.19.8"

# Python packages on the GPU machines' image ('cuda'), as recorded by this workplace
# (/work/.library/device/KINDS.md, read 2026-11-17). Names normalised (PEP 503).
GPU_MACHINE_PACKAGES = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pyre-extensions
pygments pyparsing pyproject-hooks pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split()

PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"]
# The GPU machine's interpreter, for evaluating environment markers of the wheels' requirements.
TARGET_ENVIRONMENT = {
    "python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
    "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
    "platform_machine": "x86_64", "os_name": "posix", "extra": "",
}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def run(command: list[str], env: dict[str, str] | None = None) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, env=env)


def download(dest: str) -> None:
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
         "--implementation", "cp", *platforms, "-d", dest, *WHEELS])


def build_deepspeed(dest: str) -> None:
    # Needs torch importable here (no build isolation: DeepSpeed's setup.py imports it). DS_BUILD_OPS=0:
    # compile no op ahead of time, so the wheel is pure Python.
    env = {**os.environ, "DS_BUILD_OPS": "0"}
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir", "-w", dest, DEEPSPEED], env=env)


def wheel_requirements(path: str) -> tuple[str, list[str]]:
    """(project name, Requires-Dist lines) of a wheel."""
    with zipfile.ZipFile(path) as archive:
        metadata = next(name for name in archive.namelist() if name.endswith(".dist-info/METADATA"))
        message = email.parser.Parser().parsestr(archive.read(metadata).decode())
    return message["Name"], message.get_all("Requires-Dist") or []


def check(dest: str) -> list[str]:
    """Problems: requirements (for the target interpreter) met neither by ``dest`` nor by the machine; two
    versions of one project in ``dest``."""
    from packaging.requirements import Requirement

    wheels = sorted(f for f in os.listdir(dest) if f.endswith(".whl"))
    shipped: dict[str, str] = {}
    problems: list[str] = []
    requirements: list[tuple[str, str]] = []
    for wheel in wheels:
        name, requires = wheel_requirements(os.path.join(dest, wheel))
        if normalise(name) in shipped:
            problems.append(f"two wheels of {name}: {shipped[normalise(name)]} and {wheel} (pip would refuse both)")
        shipped[normalise(name)] = wheel
        requirements += [(wheel, line) for line in requires]
    available = set(shipped) | {normalise(n) for n in GPU_MACHINE_PACKAGES}
    for wheel, line in requirements:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate(TARGET_ENVIRONMENT):
            continue  # an extra, or another Python / platform
        if normalise(requirement.name) not in available:
            problems.append(f"{wheel} needs {line!r}: neither in {dest} nor on the GPU machine")
    return problems


def report(dest: str) -> None:
    total = 0
    for wheel in sorted(f for f in os.listdir(dest) if f.endswith(".whl")):
        size = os.path.getsize(os.path.join(dest, wheel))
        total += size
        print(f"  {wheel:70s} {size / 2**10:9.0f} KiB")
    print(f"  {'total':70s} {total / 2**20:9.1f} MiB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", default=os.path.join(REPO, ".whl"), help="wheel folder (default: .whl in the repo, ignored by git)")
    parser.add_argument("--check-only", action="store_true", help="only check and list what --dest holds")
    args = parser.parse_args(argv)
    os.makedirs(args.dest, exist_ok=True)
    if not args.check_only:
        download(args.dest)
        build_deepspeed(args.dest)
    print(f"wheels in {args.dest}:")
    report(args.dest)
    problems = check(args.dest)
    for problem in problems:
        print("PROBLEM:", problem)
    if not problems:
        print("every requirement of every wheel is met by the folder or by the GPU machine's packages")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
