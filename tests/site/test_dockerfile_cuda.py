"""The GPU image's torch matches its CUDA base image, and GPU extras are pinned."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = (REPO / "docker" / "Dockerfile").read_text()


def arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE, re.MULTILINE)
    assert match, f"docker/Dockerfile has no ARG {name}=..."
    return match.group(1)


def test_cuda_torch_build_matches_the_base_image():
    # nvidia/cuda:12.9.1-... <-> download.pytorch.org/whl/cu129
    cuda = re.match(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-", arg("CUDA_IMAGE"))
    index = re.search(r"/whl/cu(\d+)$", arg("TORCH_CUDA_INDEX"))
    assert cuda and index
    assert index.group(1) == cuda.group(1) + cuda.group(2)
    assert "FROM ${CUDA_IMAGE} AS base-cuda" in DOCKERFILE


def test_the_image_installs_the_torch_version_requirements_pin_from_the_matching_index():
    pins = re.findall(r"^torch==(\S+)$", (REPO / "requirements.txt").read_text(), re.MULTILINE)
    assert len(pins) == 1
    # The version is read from requirements.txt at build time, never written twice.
    assert "torch==2." not in DOCKERFILE
    assert "grep -E '^torch==' requirements.txt" in DOCKERFILE
    assert '--index-url "$index"' in DOCKERFILE and 'index="$TORCH_CUDA_INDEX"' in DOCKERFILE


def test_the_driver_the_image_needs_is_documented():
    assert re.search(r"driver >= \d{3}\.\d+\.\d+", DOCKERFILE)


def test_gpu_extras_are_pinned_and_installed_only_in_the_gpu_image():
    lines = [
        line
        for line in (REPO / "requirements-gpu.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines and all(re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[\w.]+", line) for line in lines)
    assert 'if [ "$DEVICE" != "cpu" ]; then pip install -r requirements-gpu.txt; fi' in DOCKERFILE
