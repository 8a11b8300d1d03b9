"""One source for every measured number in the docs: the docs' tables and figures rendered from the
results recorded under docs/results/ (experiments/records.py) alone.

    python sweeps.py prb-table ... --record prb-base   # a sweep, and docs/results/prb-base.json
    python sweeps.py render                            # every table and figure, from the JSON alone

A page takes a recorded table between markers, rendered in place:

    <!-- table: prb-base -->             (every table of the record; `prb-base 1`: the second only)
    ...
    <!-- end of table -->

and a figure the same way (`<!-- figure: prb-leak -->` ... `<!-- end of figure -->`): the image,
its caption, a link to the JSON behind it and the command that re-measures it. Figures are drawn by
experiments/figures.py into docs/figures/; each PNG carries the hash of the JSON it was drawn from,
so tests/test_rendered_docs.py can tell a figure drawn from today's data from a stale one, and that
test fails whenever a page differs from what its JSON renders: a number there changes only by
re-measuring.
"""

import os
import re

from experiments.figures import FIGURES as DRAWN
from experiments.figures import draw_all
from experiments import cpu_table
from experiments.records import FIGURES, ROOT, load, source_hash, table_lines
from plumbing.cli import InputError, Parser, write_atomically

PAGES = ["README.md", *(os.path.join("docs", page) for page in (
    "results.md", "prb.md", "regbert.md", "memft.md", "moc.md", "atoms.md", "grit.md",
    "extending.md", "ecosystem.md", "training.md"))]
MARKER = re.compile(r"<!-- (table|figure): ([\w.-]+)(?: (\d+))? -->\n(.*?)<!-- end of \1 -->",
                    re.S)


# ------------------------------------------------------------------------------ pages
def relative(page, path):
    return os.path.relpath(os.path.join(ROOT, path), os.path.dirname(os.path.join(ROOT, page)))


def rendered_table(name, index):
    tables = load(name)["tables"]
    if index is not None and index >= len(tables):
        raise InputError(f"{name}.json has {len(tables)} table(s); no table {index}")
    chosen = tables if index is None else [tables[index]]
    return "\n\n".join("\n".join(table_lines(t)) for t in chosen) + "\n"


def rendered_figure(page, name):
    if name not in DRAWN:
        raise InputError(f"{page} names a figure {name!r} that experiments/figures.py does not "
                         "draw")
    _, sources, alt, caption = DRAWN[name]
    links = ", ".join(f"[{s}.json]({relative(page, f'docs/results/{s}.json')})" for s in sources)
    command = load(sources[0])["commands"][-1]
    return (f"![{alt}]({relative(page, f'docs/figures/{name}.png')})\n\n"
            f"*{caption}* Data: {links}. Re-measure: `{command}`"
            f"{' (each file names its own command)' if len(sources) > 1 else ''}.\n")


def render_page(page, text):
    """The page with every marked table and figure rendered from docs/results/."""
    def fill(m):
        kind, name, index = m[1], m[2], m[3]
        body = (rendered_table(name, None if index is None else int(index)) if kind == "table"
                else rendered_figure(page, name))
        head = f"<!-- {kind}: {name}{'' if index is None else ' ' + index} -->"
        return f"{head}\n{body}<!-- end of {kind} -->"
    return MARKER.sub(fill, text)


def marked(text):
    """(kind, name) of every marker of a page."""
    return [(m[1], m[2]) for m in MARKER.finditer(text)]


def stale(pages=PAGES):
    """The pages whose marked tables or figures differ from what docs/results/ renders, and the
    figures drawn from other data than today's (the hash in their metadata)."""
    from PIL import Image
    found = [page for page in pages
             if (text := open(os.path.join(ROOT, page), encoding="utf-8").read())
             != render_page(page, text)]
    for name, (_, sources, _, _) in DRAWN.items():
        path = os.path.join(FIGURES, f"{name}.png")
        if not os.path.isfile(path) or Image.open(path).text.get("Source") != source_hash(
                sources):
            found.append(os.path.relpath(path, ROOT))
    return found


def parse_render(argv):
    p = Parser(prog="sweeps.py render",
               description="Write every marked table of README.md and docs/ and every figure of "
                           "docs/figures/ from docs/results/*.json alone (no training).")
    p.add_argument("--check", action="store_true",
                   help="write nothing; name the pages and figures that differ from what "
                        "docs/results/ renders (exit status 2)")
    p.add_argument("--no-figures", dest="figures", action="store_false",
                   help="the pages only, not the PNGs")
    return p.parse_args(argv), []


def render_command(args, _):
    if args.check:
        if changed := stale():
            raise InputError(f"{', '.join(changed)} differ from what docs/results/ renders; "
                             "python sweeps.py render writes them")
        print("every page and figure is what docs/results/ renders")
        return
    cpu_table.render_readme()
    for page in PAGES:
        path = os.path.join(ROOT, page)
        text = open(path, encoding="utf-8").read()
        if (new := render_page(page, text)) != text:
            write_atomically(path, new)
            print(f"rendered {page}")
    if args.figures:
        draw_all()
