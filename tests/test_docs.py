"""The repository's own files: no empty logs committed; README.md and docs/ with every link, image, command
and script flag they show still working. Each `gentrain ...` line of their code blocks is checked as the CLI
checks a command before any work (cli.parse, cli.check_overrides, and a resume's checkpoint found), with
RUN_DIR and RUN standing for a tiny run made here, so a renamed key or group fails here first."""

import contextlib
import io
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAST, REPO, run_cli

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def tracked() -> list[str]:
    return subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()


def test_no_empty_log_files_are_committed():
    files = tracked() if (REPO / ".git").exists() else [str(p.relative_to(REPO)) for p in REPO.rglob("*.log")]
    empty = [f for f in files if f.endswith(".log") and (REPO / f).is_file() and (REPO / f).stat().st_size == 0]
    assert not empty, empty


def split_code(text: str) -> tuple[str, list[str]]:
    """The prose (fenced code blocks taken out) and the code blocks' lines, a line ending in a backslash
    joined to the next."""
    prose, code, inside, held = [], [], False, ""
    for line in text.split("\n"):
        if line.startswith("```"):
            inside = not inside
        elif inside and line.rstrip().endswith("\\"):
            held += line.rstrip()[:-1] + " "
        elif inside:
            code.append(held + line)
            held = ""
        else:
            prose.append(line)
    return "\n".join(prose), code


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", "")).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    prose, _ = split_code(path.read_text())
    return {slug(m) for m in re.findall(r"^#{1,6} (.*)$", prose, flags=re.M)}


def test_every_link_image_and_anchor_resolves():
    bad = []
    for path in DOCS:
        prose, _ = split_code(path.read_text())
        for target in re.findall(r"\]\(([^)\s]+)\)", prose):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            file, _, anchor = target.partition("#")
            dest = path.parent / file if file else path
            if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in anchors(dest)):
                bad.append(f"{path.name}: {target}")
    assert not bad, bad


def test_readme_is_a_short_guide_that_names_the_tested_pair_before_the_first_command():
    from gentrain import cli

    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    pair = re.search(r"torch==\S+ torchvision==\S+", (REPO / ".ci" / "run").read_text()).group(0)
    assert cli.TESTED == pair  # the mismatch error's install command is the pair CI tests
    assert pair in readme and readme.index(pair) < readme.index("\ngentrain model=")
    assert all(f"docs/{p.name}" in readme for p in DOCS[1:])  # a link to each page


def script_commands() -> list[tuple[str, str, str]]:
    """(page, script, its flags) for each `python scripts/NAME.py ...` in a code block or inline code."""
    found = []
    for path in DOCS:
        prose, code = split_code(path.read_text())
        for span in code + re.findall(r"`([^`]+)`", prose):
            for m in re.finditer(r"python scripts/(\w+\.py)((?:\s+[^\s;|]+)*)", " ".join(span.split())):
                found.append((path.name, m.group(1), " ".join(re.findall(r"(?<![\w=\"-])(--[a-z][\w-]*)", m.group(2)))))
    return sorted(set(found))


def script_help(name: str) -> str:
    out, argv = io.StringIO(), sys.argv[:]
    sys.argv = [name, "--help"]
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            runpy.run_path(str(REPO / "scripts" / name), run_name="__main__")
    finally:
        sys.argv[:] = argv
    return out.getvalue()


def test_every_script_flag_the_docs_use_is_in_the_scripts_help():
    commands = script_commands()
    assert len(commands) >= 10
    helps = {name: script_help(name) for name in {c[1] for c in commands}}
    bad = [(page, name, flag) for page, name, flags in commands for flag in flags.split()
           if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", helps[name])]
    assert not bad, bad


def gentrain_commands() -> list[tuple[str, str]]:
    found = []
    for path in DOCS:
        for line in split_code(path.read_text())[1]:
            for part in line.split(";"):
                part = re.sub(r"\s+#.*$", "", part).strip()
                if part.startswith("torchrun ") and " -m gentrain " in part:
                    part = "gentrain " + part.split(" -m gentrain ", 1)[1]
                if part.startswith("gentrain "):
                    found.append((path.name, part))
    return found


COMMANDS = list({c: (p, c) for p, c in reversed(gentrain_commands())}.values())[::-1]  # each command once


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_root) -> Path:
    """A 2-step GAN run on MNIST for RUN_DIR, with the earlier checkpoint the docs resume from."""
    run = tmp_path_factory.mktemp("docs") / "run"
    run_cli(["model=gan", "dataset=mnist", *FAST, "trainer.steps=2", f"hydra.run.dir={run}"], run.parent, data_root)
    shutil.copyfile(run / "checkpoints" / "last.pt", run / "checkpoints" / "step_0005000.pt")
    return run


def test_the_docs_show_commands_of_every_verb():
    verbs = {shlex.split(c)[1] for _, c in COMMANDS}
    assert {"sample", "eval", "encode", "decode", "classifier", "plot", "doctor"} <= verbs and len(COMMANDS) >= 60


@pytest.mark.parametrize("page, command", COMMANDS, ids=[f"{p}: {c[:70]}" for p, c in COMMANDS])
def test_each_documented_command_passes_the_checks_before_any_work(page, command, tiny_run, tmp_path, monkeypatch, capsys):
    from gentrain import cli

    filled = re.sub(r"\b(RUN_DIR|VAE_RUN|RUN)\b", str(tiny_run), command)
    filled = re.sub(r"\bDIR\b", str(tmp_path), filled)
    verb, args = cli.parse(shlex.split(filled)[1:])
    if verb == "plot":  # gentrain plot RUN_DIR [out=FILE.png], or --help
        assert all(a == "--help" or a.startswith("out=") or Path(a).is_dir() for a in args), command
        return
    if verb == "doctor":  # gentrain doctor [device=...] [seconds=...] [compile=...] [out=...], or --help
        from gentrain.commands.doctor import settings

        if args != ["--help"]:
            settings(args)
        return
    flags = [a for a in args if a.startswith("-") and a not in ("-m", "--multirun")]
    assert set(flags) <= {"--help", "--cfg", "--hydra-help"}, command
    if "--help" in flags or "--hydra-help" in flags:
        return
    args = [a for i, a in enumerate(args) if a != "--cfg" and not (a == "job" and i and args[i - 1] == "--cfg")]
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")  # SLURM's sbatch, as on a login node
    monkeypatch.chdir(tmp_path)
    try:
        cli.check_overrides(verb, args)
        if verb == "train" and any(a.startswith("resume=") for a in args) and not {"-m", "--multirun"} & set(args):
            cli._resume_dir(args)
    except SystemExit:
        pytest.fail(f"{page}: {command}: {capsys.readouterr().err.strip()}")
