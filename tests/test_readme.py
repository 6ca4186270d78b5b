"""README.md's examples run, and its command lines parse, so the docs cannot drift from the code.

Python: every fenced ``python`` block of README.md runs, in order, each in a fresh namespace, in a temporary
working directory that holds the files the examples expect the user to supply (made here, see ``_user_files``).
A block preceded by the line ``<!-- readme-test: meta -->`` runs under ``with torch.device("meta"):``: it builds
full-size networks and runs a 32×224×224 forward, which only needs shapes to be checked (a few seconds on meta
tensors instead of minutes of CPU), and the files it loads are then state dicts of meta tensors.

Shell: every ``nlnet ...`` line of the fenced ``bash`` blocks of README.md and docs/*.md names a subcommand of
``nlnet.cli``'s parser (its ``--help`` exits 0), every ``--option`` it passes is one that subcommand declares, and
a line without placeholders (``...``, ``[...]``) parses with argparse as it stands (nothing is run).
``python benchmarks/X.py --option`` lines name a script that declares each option. ``make`` targets exist.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
META_MARKER = "<!-- readme-test: meta -->"
_FENCE = re.compile(r"^```(\w*)\s*$")


def _fenced_blocks(path: Path) -> list[tuple[str, str, int, bool]]:
    """(language, code, first line number, preceded by the meta marker) of every fenced block, indented ones too."""
    blocks, lines = [], path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i].strip())
        if match is None:
            i += 1
            continue
        indent = len(lines[i]) - len(lines[i].lstrip())
        previous = next((line.strip() for line in reversed(lines[:i]) if line.strip()), "")
        body, j = [], i + 1
        while j < len(lines) and lines[j].strip() != "```":
            body.append(lines[j][indent:])
            j += 1
        blocks.append((match.group(1), "\n".join(body) + "\n", i + 2, previous == META_MARKER))
        i = j + 1
    return blocks


PYTHON_BLOCKS = [b for b in _fenced_blocks(README) if b[0] == "python"]
BASH_FILES = [README, *sorted((ROOT / "docs").glob("*.md"))]
BASH_BLOCKS = [(path, b) for path in BASH_FILES for b in _fenced_blocks(path) if b[0] == "bash"]


def test_readme_has_examples_and_sections() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(PYTHON_BLOCKS) >= 4 and len(BASH_BLOCKS) >= 4
    first_block = _fenced_blocks(README)[0]
    assert first_block[0] == "bash" and "make run" in first_block[1] and "make test" in first_block[1]
    for section in ("block", "models", "training", "builtin", "detection", "viz", "reproducibility", "benchmarks"):
        assert f"<!-- section:{section} -->" in text
    assert text.index("<!-- section:reproducibility -->") < text.index("<!-- section:benchmarks -->")


# --- files the examples expect the user to have ------------------------------------------------------------


def _save_meta_state_dict(build, path: Path) -> None:
    with torch.device("meta"):
        state = build().state_dict()
    torch.save(state, path)


def _write_video(path: Path, frames: int = 64, height: int = 96, width: int = 128) -> None:
    import av
    import numpy as np

    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(frames):
            image = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8).repeat(16, 0).repeat(16, 1)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


def _write_checkpoint(path: Path) -> None:
    """A checkpoint laid out as ``nlnet train`` writes one: the NL I3D R50 recipe at base width 8 (cheap on CPU)."""
    from omegaconf import OmegaConf

    from nlnet.engine.build import build_network
    from nlnet.engine.checkpoint import save_checkpoint
    from nlnet.engine.config import load_config

    cfg = load_config("kinetics_nl_i3d_r50_32x2", ["model.overrides.base_width=8"])
    torch.manual_seed(0)
    model = build_network(cfg.model)
    save_checkpoint(path, {"model": model.state_dict(), "config": OmegaConf.to_container(cfg, resolve=True)})


def _user_files(code: str, workdir: Path) -> None:
    """Makes, in ``workdir``, the user-supplied files that ``code`` names."""
    if not any(name in code for name in ("resnet50-imagenet.pth", "resnet50-0676ba61.pth", "maskrcnn_coco.pth")):
        torchvision = None
    else:
        import torchvision

    if "resnet50-imagenet.pth" in code:
        _save_meta_state_dict(torchvision.models.resnet50, workdir / "resnet50-imagenet.pth")
    if "resnet50-0676ba61.pth" in code:
        _save_meta_state_dict(torchvision.models.resnet50, workdir / "resnet50-0676ba61.pth")
    if "maskrcnn_coco.pth" in code:
        build = torchvision.models.detection.maskrcnn_resnet50_fpn
        _save_meta_state_dict(lambda: build(weights=None, weights_backbone=None), workdir / "maskrcnn_coco.pth")
    if "clip.mp4" in code:
        _write_video(workdir / "clip.mp4")
    for name in re.findall(r"runs/[\w/]+/checkpoint_\d+\.pt", code):
        _write_checkpoint(workdir / name)


@pytest.mark.parametrize(
    "block", PYTHON_BLOCKS, ids=[f"README.md:{line}" for _, _, line, _ in PYTHON_BLOCKS]
)
def test_python_example_runs(block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, code, line, on_meta = block
    monkeypatch.chdir(tmp_path)
    _user_files(code, tmp_path)
    namespace = {"__name__": "__readme__"}
    compiled = compile("\n" * (line - 1) + code, str(README), "exec")
    context = torch.device("meta") if on_meta else contextlib.nullcontext()
    with torch.random.fork_rng(), context:
        torch.manual_seed(0)
        exec(compiled, namespace)  # noqa: S102 - the README's own example
        _check_comments(code, namespace)


_SHAPE_COMMENT = re.compile(r"^(\w+) = .*#\s*\(([\d, ]+)\)")
_LIST_COMMENT = re.compile(r"^(list\(.*\))\s+#\s*(\[.*?\])")


def _check_comments(code: str, namespace: dict) -> None:
    """What the comments promise: ``name = ...  # (2, 400)`` is that shape, ``list(...)  # ['a', 'b']`` that list."""
    import ast

    for line in code.splitlines():
        if match := _SHAPE_COMMENT.match(line):
            expected = tuple(int(n) for n in match.group(2).replace(" ", "").split(",") if n)
            assert tuple(namespace[match.group(1)].shape) == expected, line
        elif (match := _LIST_COMMENT.match(line)) and "..." not in match.group(2):  # not an abridged list
            try:
                expected = ast.literal_eval(match.group(2))
            except (ValueError, SyntaxError):
                continue  # a comment that is no literal
            assert eval(match.group(1), namespace) == expected, line  # noqa: S307 - the README's own expression


# --- command lines -------------------------------------------------------------------------------------------


def _command_lines(code: str) -> list[list[str]]:
    """Each command of a shell block as tokens, comments dropped and continuation lines joined."""
    joined = re.sub(r"\\\n", " ", code)
    return [tokens for line in joined.splitlines() if (tokens := shlex.split(line, comments=True))]


def _subcommand(parser: argparse.ArgumentParser, words: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    """The (nested) subparser that ``words`` selects, and the words that name it."""
    path = []
    while True:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions or not words or words[0] not in actions[0].choices:
            if actions:
                raise AssertionError(f"no subcommand {words[:1]} after nlnet {' '.join(path)}")
            return parser, path
        path.append(words[0])
        parser, words = actions[0].choices[words[0]], words[1:]


def _nlnet_commands() -> list[tuple[str, list[str]]]:
    found = []
    for path, (_, code, line, _) in BASH_BLOCKS:
        for tokens in _command_lines(code):
            if tokens[0] == "torchrun":
                tokens = tokens[tokens.index("nlnet"):] if "nlnet" in tokens else []
            if tokens and tokens[0] == "nlnet":
                found.append((f"{path.name}:{line}", tokens[1:]))
    return found


NLNET_COMMANDS = _nlnet_commands()


def test_every_nlnet_subcommand_has_help() -> None:
    from nlnet.cli import _build_parser

    for where, args in NLNET_COMMANDS:
        _, path = _subcommand(_build_parser(), args)
        assert path, f"{where}: nlnet {' '.join(args)} names no subcommand"
        with pytest.raises(SystemExit) as exit_info, contextlib.redirect_stdout(io.StringIO()):
            _build_parser().parse_args([*path, "--help"])
        assert exit_info.value.code == 0, where


@pytest.mark.parametrize("command", NLNET_COMMANDS, ids=[f"{w} {' '.join(a[:2])}" for w, a in NLNET_COMMANDS])
def test_nlnet_command_line_parses(command) -> None:
    from nlnet.cli import _build_parser

    where, args = command
    parser, path = _subcommand(_build_parser(), args)
    declared = {option for action in parser._actions for option in action.option_strings}
    for token in args[len(path):]:
        option = token.strip("[]").split("=", 1)[0]
        if option.startswith("--"):
            assert option in declared, f"{where}: nlnet {' '.join(path)} has no option {option}"
    if any("..." in token or "[" in token or "]" in token for token in args):
        return  # a placeholder: the options were checked, the line as a whole is not meant to parse
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            _build_parser().parse_args(args)
    except SystemExit as err:
        raise AssertionError(f"{where}: nlnet {' '.join(args)} does not parse: {stderr.getvalue()}") from err


def test_benchmark_and_make_command_lines() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    for path, (_, code, line, _) in BASH_BLOCKS:
        for tokens in _command_lines(code):
            if tokens[0] == "make":
                for target in tokens[1:]:
                    assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"{path.name}:{line}: make {target}"
            script = next((t for t in tokens if t.startswith("benchmarks/") and t.endswith(".py")), None)
            if script is not None:
                source = (ROOT / script).read_text(encoding="utf-8")
                for token in tokens[tokens.index(script) + 1:]:
                    if token.startswith("--"):
                        option = token.split("=", 1)[0]
                        assert f'"{option}"' in source, f"{path.name}:{line}: {script} has no option {option}"
