"""The documentation holds: a README a person reads in ten minutes, a page per paper and per topic,
each opening with its contents; every relative link resolves (files and anchors); every `python ...`
command line parses its flags (no training: the scripts' own parsers); and every measured table of a
paper's page is also in docs/results.md."""

import importlib
import os
import re
import shlex

import pytest

from helpers import ROOT, load_prepare_module

PAGES = ["prb", "regbert", "memft", "moc", "atoms", "grit", "extending", "ecosystem", "failures",
         "results", "training", "teaching"]
DOCS = ["README.md", *(f"docs/{page}.md" for page in PAGES)]


def read(path):
    return open(os.path.join(ROOT, path), encoding="utf-8").read()


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path):
    text = re.sub(r"```.*?```", "", read(path), flags=re.S)
    return {slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def test_the_readme_reads_in_ten_minutes():
    assert len(read("README.md").encode()) <= 20_000


@pytest.mark.parametrize("path", DOCS)
def test_every_page_opens_with_its_contents(path):
    lines = read(path).splitlines()
    assert lines[0].startswith("# ")
    start = lines.index("Contents:")
    assert start < 15, f"{path}: the contents list is not at the top"
    entries = []
    for line in lines[start + 1:]:
        if entries and not line.strip():
            break
        if line.strip():
            entries.append(line)
    assert len(entries) >= 2 and all(re.match(r"\s*- \[.+\]\(#[\w-]+\)$", e) for e in entries)


def links(path):
    text = re.sub(r"```.*?```", "", read(path), flags=re.S)
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("path", DOCS)
def test_every_relative_link_resolves(path):
    folder = os.path.dirname(path)
    for link in links(path):
        if re.match(r"[a-z]+://", link):
            continue
        target, _, anchor = link.partition("#")
        target_path = os.path.normpath(os.path.join(folder, target)) if target else path
        assert os.path.exists(os.path.join(ROOT, target_path)), f"{path}: {link} does not exist"
        if anchor:
            assert anchor in anchors(target_path), f"{path}: {link} names no heading there"


# ------------------------------------------------------------------------------ command lines
def command_lines(path):
    """Every `python ...` command of a page: the lines of its code blocks (continuations joined,
    comments dropped) and its inline code spans."""
    text = read(path)
    found = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S):
        variables = {}  # NAME="value" lines of the block, substituted into the commands after them
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if assignment := re.fullmatch(r'(\w+)="([^"]*)"', line):
                variables[assignment[1]] = assignment[2]
            for name, value in variables.items():
                line = line.replace(f"${name}", value)
            if line.startswith("python "):
                found.append(line)
    found += [span for span in re.findall(r"`(python [^`]+)`", re.sub(r"```.*?```", "", text,
                                                                      flags=re.S))]
    return [c for c in found if not c.startswith(("python -m", "python -c"))]


class Parsed(Exception):
    pass


def parse_command(words, monkeypatch):
    """Parse one command line with its script's parser, and stop there."""
    script, argv = words[1], words[2:]
    if script in ("sweeps.py", "bench.py"):  # --record NAME: theirs, read before the parsers
        from experiments.records import recorded_as
        argv = recorded_as(argv)[0]
    if script == "train.py":
        import train
        if "--peft_adapter" in argv:  # reading the adapter is not parsing: argparse alone
            return train.parser_of(argv)[0].parse_args(argv)
        return train.parse_args(argv)
    if script == "sweeps.py":
        import sweeps
        import train
        _, _, train_flags = sweeps.parse_command(argv)
        from catalog import add_every_flag
        return add_every_flag(train.build_parser()).parse_args(train_flags)
    if script == "bench.py":
        import bench
        return bench.parse_command(argv)
    from plumbing import cli
    real = cli.Parser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(real(self, args, namespace))
    monkeypatch.setattr(cli.Parser, "parse_args", parse_then_stop)
    if script.startswith("data/"):
        module = load_prepare_module(script.split("/")[1])
    else:
        module = importlib.import_module(script.removesuffix(".py").replace("/", "."))
    with pytest.raises(Parsed):
        module.main(argv)


def all_commands():
    return sorted({(path, command) for path in DOCS for command in command_lines(path)})


def test_the_pages_have_commands():
    assert len(all_commands()) >= 60


@pytest.mark.parametrize("path, command", all_commands())
def test_every_command_line_parses(path, command, monkeypatch, capsys):
    words = shlex.split(command)
    assert os.path.isfile(os.path.join(ROOT, words[1])), f"{path}: no script {words[1]}"
    try:
        parse_command(words, monkeypatch)
    except SystemExit as stopped:  # --help prints and exits 0: it parsed
        if stopped.code != 0:
            pytest.fail(f"{path}: `{command}` does not parse: "
                        f"{capsys.readouterr().err.strip()}")


# ------------------------------------------------------------------------------ measured tables
@pytest.mark.parametrize("page", ["prb", "regbert", "memft", "moc", "atoms", "grit"])
def test_every_measured_table_is_in_the_results_page(page):
    """Each table a paper page renders from docs/results/ (tests/test_rendered_docs.py) is rendered
    in docs/results.md too."""
    from experiments import render
    tables = [name for kind, name in render.marked(read(f"docs/{page}.md")) if kind == "table"]
    assert tables, f"docs/{page}.md renders no measured table"
    in_results = {name for kind, name in render.marked(read("docs/results.md")) if kind == "table"}
    missing = [name for name in tables if name not in in_results]
    assert not missing, f"docs/{page}.md renders {missing}, which docs/results.md does not"


def test_the_cpu_table_is_rendered_from_its_json():
    """The README's CPU commands and table, and their copy in docs/results.md, are what
    docs/results/cpu-table.json renders; the JSON's commands are today's (a number there changes
    only by re-measuring: python sweeps.py cpu-table)."""
    import json

    from experiments import cpu_table
    data = json.load(open(cpu_table.RESULTS))
    assert data["commands"] == {"T": cpu_table.T, **cpu_table.COMMANDS}
    assert [row["method"] for row in data["rows"]] == list(cpu_table.COMMANDS)
    for page, commands in (("README.md", True), ("docs/results.md", False)):
        assert cpu_table.rendered(data, commands) in read(page), f"{page}: render it again"
    assert cpu_table.main_command_sentence(data) in read("README.md")
    assert data["main_command"]["argv"][:-2] == cpu_table.MAIN
