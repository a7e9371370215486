"""The container images: built elsewhere (no registry for base images here), so what can be
checked here is checked: they install with the script every environment is made with
(`make install` runs it, so CI tests what the images install), in stages, as a non-root
user, and the KubeRay manifests name them."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "cluster" / "images"


def stages(dockerfile: Path) -> list[list[str]]:
    """The instructions of each stage (continuation lines joined)."""
    text = dockerfile.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]
    out: list[list[str]] = []
    for line in lines:
        if line.upper().startswith("FROM "):
            out.append([])
        out[-1].append(line)
    return out


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_images_install_like_make_in_stages_and_run_as_a_user(name):
    built = stages(IMAGES / name)
    assert len(built) >= 2, "multi-stage: the build's tools stay out of the image"
    installs = [i for stage in built for i in stage if "cluster/images/install.sh /opt/raygen" in i]
    assert len(installs) == 1
    final = built[-1]
    assert any(i.startswith("COPY --from=build /opt/raygen") for i in final)
    assert "USER 1000" in final and not any(i == "USER root" for i in final)
    assert any("useradd --create-home --uid 1000 raygen" in i for i in final)
    assert any("wget" in i for stage in built for i in stage)  # KubeRay's probes use it


def test_make_installs_with_the_images_script():
    makefile = (ROOT / "Makefile").read_text()
    assert 'cluster/images/install.sh $(VENV) -e ".[test]"' in makefile
