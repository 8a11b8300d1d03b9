"""Every measured number of the docs has one source: the docs' tables and figures are what
docs/results/*.json renders (experiments/render.py, experiments/figures.py), so a number changes
only by re-measuring. A page that differs from its rendering, an image that is missing, a figure
with no JSON behind it or drawn from older JSON, a measured table outside the markers: each fails
here with the command that puts it right (python sweeps.py render)."""

import json
import os
import re
import subprocess
import sys

import pytest

from helpers import ROOT

sys.path.insert(0, ROOT)
from experiments import figures, records, render  # noqa: E402

DOCS = ["README.md", *(os.path.join("docs", p) for p in sorted(os.listdir(
    os.path.join(ROOT, "docs"))) if p.endswith(".md"))]
# measured tables rendered by other means: the reading path (tests/test_reading_path.py) and the
# README's CPU table (sweeps.py cpu-table, tests/test_docs.py)
OTHER_RENDERERS = ("<!-- reading path:", "<!-- cpu table:")


def read(page):
    return open(os.path.join(ROOT, page), encoding="utf-8").read()


@pytest.mark.parametrize("page", render.PAGES)
def test_every_page_is_what_its_json_renders(page):
    text = read(page)
    assert render.render_page(page, text) == text, (
        f"{page} differs from what docs/results/ renders: python sweeps.py render")


def test_every_page_with_markers_is_rendered():
    """A page outside render.PAGES would never be rendered: none may hold a marker."""
    for page in DOCS:
        if page not in render.PAGES:
            assert not render.marked(read(page)), f"{page} has markers; add it to render.PAGES"


def tables_outside_markers(text):
    """The markdown tables of a page that hold a measured number (a cell that is a decimal number,
    or a ±) and sit in no marked section."""
    for pattern in (render.MARKER, re.compile(r"<!-- (?:reading path|cpu table):.*?<!-- end",
                                              re.S)):
        text = pattern.sub("", text)
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    found, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append(line)
        elif block:
            cells = [c.strip() for row in block[2:] for c in row.strip("|").split("|")]
            if any("±" in c or re.fullmatch(r"[−+-]?[\d,]*\.\d+ ?[%×x]?", c) for c in cells):
                found.append(block[0])
            block = []
    return found


@pytest.mark.parametrize("page", DOCS)
def test_every_measured_table_is_rendered_from_json(page):
    loose = tables_outside_markers(read(page))
    assert not loose, (f"{page}: a measured table typed by hand ({loose[0][:60]}...): record it "
                       "(--record NAME) and mark it <!-- table: NAME -->")


def recorded_cells():
    cells = set()
    for file in os.listdir(records.RESULTS):
        for table in json.load(open(os.path.join(records.RESULTS, file))).get("tables", []):
            cells.update(cell for row in table["rows"] for cell in row)
    return cells


@pytest.mark.parametrize("page", render.PAGES)
def test_every_mean_and_spread_in_the_prose_is_a_recorded_number(page):
    """A 'mean ± std' the text quotes is a cell of some recorded table: re-measuring a table
    makes every sentence that quoted its old numbers fail here until it is rewritten."""
    text = re.sub(r"```.*?```", "", render.MARKER.sub("", read(page)), flags=re.S)
    cells = recorded_cells()
    stale = [m for m in re.findall(r"[−-]?\d+\.\d+ ± \d+\.\d+", text)
             if not any(m.replace("−", "-") in c.replace("−", "-") for c in cells)]
    assert not stale, f"{page} quotes {stale[:3]}, which no table of docs/results/ holds"


@pytest.mark.parametrize("page", DOCS)
def test_every_image_a_doc_links_exists(page):
    for image in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", read(page)):
        path = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), image))
        assert os.path.isfile(path), f"{page} shows {image}, which does not exist"


def test_every_figure_has_its_json_is_current_and_small():
    from PIL import Image
    on_disk = {f.removesuffix(".png") for f in os.listdir(records.FIGURES)}
    assert on_disk == set(figures.FIGURES), (
        f"docs/figures/ holds {sorted(on_disk ^ set(figures.FIGURES))}, which experiments/"
        "figures.py does or does not draw")
    assert len(figures.FIGURES) >= 8
    for name, (_, sources, _, _) in figures.FIGURES.items():
        for source in sources:
            assert os.path.isfile(os.path.join(records.RESULTS, f"{source}.json")), (name, source)
        path = os.path.join(records.FIGURES, f"{name}.png")
        assert os.path.getsize(path) <= 150_000, f"{name}.png is over 150 KB"
        drawn_from = Image.open(path).text.get("Source")
        assert drawn_from == records.source_hash(sources), (
            f"{name}.png was drawn from other data than {sources}: python sweeps.py render")


def test_every_figure_is_shown():
    shown = {name for page in render.PAGES for kind, name in render.marked(read(page))
             if kind == "figure"}
    assert shown == set(figures.FIGURES)


def test_the_figures_draw_from_the_json_alone(tmp_path, monkeypatch):
    """Every figure drawn again, from docs/results/ only, at the size committed."""
    from PIL import Image
    monkeypatch.setattr(figures, "FIGURE_DIR", str(tmp_path))
    for name in figures.FIGURES:
        figures.draw(name)
        with Image.open(tmp_path / f"{name}.png") as new, \
                Image.open(os.path.join(records.FIGURES, f"{name}.png")) as committed:
            assert new.size == committed.size, name


def test_every_record_says_where_it_came_from():
    for file in os.listdir(records.RESULTS):
        data = json.load(open(os.path.join(records.RESULTS, file)))
        assert data.get("commands") and data.get("commit"), file
        if "tables" in data:  # a table or bench record (cpu-table and model-sites have their own)
            assert data["name"] == file.removesuffix(".json")
            assert data["source"] in ("measured", "transcribed"), file
            assert data["source"] == "transcribed" or data["measured"], file


def test_the_model_sites_picture_is_what_the_code_builds():
    from experiments import sites
    recorded = json.load(open(os.path.join(records.RESULTS, "model-sites.json")))
    built = sites.measured()
    assert recorded["methods"] == built["methods"], "python sweeps.py sites, then render"
    assert recorded["n_layer"] == built["n_layer"]


# ------------------------------------------------------------------------------ recording
def test_a_table_round_trips_through_its_record():
    from plumbing.cli import markdown
    lines = markdown(["arm", "setting", "val"], [["lora", "", "6.885 ± 0.002"],
                                                 ["prb", "leaky", "6.4"]], left=2)
    assert records.table_lines(records.parse_tables(["intro", "", *lines, "", "after"])[0]) == lines


def test_recording_and_rendering_a_result(tmp_path, monkeypatch):
    """--record's file renders into a page between its markers; a number edited by hand in the page
    is put back, and --check names the stale page."""
    monkeypatch.setattr(records, "RESULTS", str(tmp_path))
    from plumbing.cli import InputError, markdown
    lines = ["Base: scratch.", "", *markdown(["arm", "val"], [["lora", "6.885 ± 0.002"]])]
    records.record("toy-result", "python sweeps.py prb-table --record toy-result", lines,
                  {"summaries": {"lora": [{"final": {"val_loss": 6.885}}]}})
    data = json.load(open(tmp_path / "toy-result.json"))
    assert data["tables"][0]["rows"] == [["lora", "6.885 ± 0.002"]]
    assert data["note"] == "Base: scratch." and data["machine"] and data["measured"]
    page = "text\n<!-- table: toy-result -->\n| stale |\n<!-- end of table -->\nmore\n"
    assert render.render_page("docs/x.md", page) == (
        "text\n<!-- table: toy-result -->\n" + "\n".join(lines[2:]) +
        "\n<!-- end of table -->\nmore\n")
    with pytest.raises(InputError, match="no recorded result"):
        render.render_page("docs/x.md", "<!-- table: missing -->\n<!-- end of table -->")
    with pytest.raises(InputError, match="--record takes a name"):
        records.recorded_as(["prb-table", "--record", "../escape"])


def test_render_check_names_a_stale_page(tmp_path):
    """`sweeps.py render --check` on a copy of the repository's docs with one number changed."""
    import shutil
    copy = tmp_path / "repo"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", "out", "data", "*.pt"))
    page = copy / "docs" / "prb.md"
    text = page.read_text()
    changed = re.sub(r"(<!-- table: prb-base -->\n(?:.*\n){2}\| lora-r32 \| corrected \| "
                     r"262,144 \| )6\.885", r"\g<1>6.123", text)
    assert changed != text
    page.write_text(changed)
    check = subprocess.run([sys.executable, "sweeps.py", "render", "--check"], cwd=copy,
                           capture_output=True, text=True)
    assert check.returncode == 2 and "docs/prb.md differ" in check.stderr
    fixed = subprocess.run([sys.executable, "sweeps.py", "render", "--no-figures"], cwd=copy,
                           capture_output=True, text=True)
    assert fixed.returncode == 0, fixed.stderr
    assert page.read_text() == text


def test_a_bench_and_the_toy_record_what_they_print(tmp_path, monkeypatch, capsys):
    """bench.py and experiments/toy.py with --record: the table they print and the per-run numbers
    behind it, as a docs/results/ file that renders."""
    monkeypatch.setattr(records, "RESULTS", str(tmp_path))
    import bench
    bench.main(["generate", "--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--seq_len", "4",
                "--new_tokens", "4", "--steps", "1", "--warmup", "0", "--device", "cpu", "--json",
                str(tmp_path / "g.json"), "--record", "tiny-bench"])
    data = json.load(open(tmp_path / "tiny-bench.json"))
    assert data["commands"] == ["python bench.py generate --n_layer 1 --n_head 2 --n_embd 16 "
                                f"--seq_len 4 --new_tokens 4 --steps 1 --warmup 0 --device cpu "
                                f"--json {tmp_path / 'g.json'} --record tiny-bench"]
    assert [row[0] for row in data["tables"][0]["rows"]][:2] == ["GPT-2, KV cache",
                                                                "GPT-2, recompute"]
    assert len(data["data"]["results"]) == 4
    from experiments import toy
    toy.main(["--seeds", "2", "--steps", "30", "--width", "16", "--out_dir", str(tmp_path / "toy"),
              "--record", "tiny-toy"])
    data = json.load(open(tmp_path / "tiny-toy.json"))
    lora = next(arm for arm in data["data"]["results"] if arm.startswith("lora-r"))
    assert {r["seed"] for r in data["data"]["results"][lora]} == {0, 1}
    assert "losses" not in data["data"]["results"][lora][0]
    assert render.render_page("docs/x.md", "<!-- table: tiny-toy -->\n<!-- end of table -->") \
        .count(f"| {lora} |") == 1
