"""The floors of src/llmscape (docs/architecture.md): every module sits in a room (a top-level module, or a
package with all its modules) on a floor; a room imports only from its own floor or below, the rooms of
the stage floor import none of each other, and no modules import each other in a circle. An import inside
a function counts like any other (it hides the arrow, it does not remove it). The picture in
docs/architecture.md is drawn from the same imports and must match them:

    python3 tests/test_architecture.py     # prints the picture, to paste into docs/architecture.md
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "llmscape"
DOC = ROOT / "docs" / "architecture.md"

#: floor -> (its name, its rooms); a room is ``llmscape.<room>`` and everything under it
FLOORS = {
    0: ("base", ["llmscape", "errors", "projections", "partitioned"]),
    1: ("files and machine", ["io", "weightfiles", "owner", "assets", "devices", "hardware", "rulekit"]),
    2: ("inputs", ["data", "prompts", "integrity", "adapters", "gpufit", "models"]),
    3: ("stages", ["extract", "spectra", "geometry"]),
    4: ("fine-tuning", ["finetune"]),
    5: ("join", ["join"]),
    6: ("planning and checks", ["cost", "plan", "configcheck"]),
}
#: top-level modules that belong to another room
ROOM_OF_MODULE = {"extract_job": "extract"}
#: floors whose rooms import none of each other (each stage reads the others' files, never their code)
SEPARATE_ROOMS = {3}
FLOOR_OF = {room: floor for floor, (_, rooms) in FLOORS.items() for room in rooms}
BEGIN, END = "<!-- imports: begin (python3 tests/test_architecture.py) -->", "<!-- imports: end -->"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room(module: str) -> str:
    top = module.split(".")[1] if "." in module else "llmscape"
    return ROOM_OF_MODULE.get(top, top)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """llmscape modules that the file imports, at any depth (in functions too); ``from pkg import sub``
    names the submodule where one exists, else the package."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                sub = f"{target}.{a.name}"
                found |= {sub} if sub in modules else ({target} & modules)
    return found - {name}


def import_graph() -> dict[str, set[str]]:
    """module -> the llmscape modules it imports, for every module of src/llmscape."""
    paths = {module_name(p): p for p in SRC.rglob("*.py")}
    return {m: imports_of(p, set(paths)) for m, p in sorted(paths.items())}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Modules that import each other in a circle: the strongly connected components of more than one
    module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def room_arrows(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    return {(room(a), room(b)) for a, targets in graph.items() for b in targets if room(a) != room(b)}


def picture(graph: dict[str, set[str]]) -> str:
    """The rooms by floor and the arrows between them, as a mermaid flowchart; arrows into the base
    floor are left out (every room may use it)."""
    lines = ["```mermaid", "flowchart BT"]
    for floor in sorted(FLOORS, reverse=True):
        name, rooms = FLOORS[floor]
        lines.append(f'    subgraph F{floor}["{floor} {name}"]')
        lines += [f"        {r}" for r in rooms]
        lines.append("    end")
    for a, b in sorted(room_arrows(graph)):
        if FLOOR_OF.get(b) != 0:
            lines.append(f"    {a} --> {b}")
    return "\n".join(lines + ["```"])


def test_every_module_sits_in_a_room_on_a_floor():
    lost = sorted({room(m) for m in import_graph()} - set(FLOOR_OF))
    assert not lost, (f"rooms on no floor: {lost}. Fix: add each to FLOORS in tests/test_architecture.py and to "
                      "docs/architecture.md (and regenerate its picture)")


def test_no_import_from_a_lower_floor_to_a_higher_one():
    up = sorted(f"{a} ({FLOOR_OF[room(a)]}) imports {b} ({FLOOR_OF[room(b)]})"
                for a, targets in import_graph().items() for b in targets
                if room(a) in FLOOR_OF and room(b) in FLOOR_OF and FLOOR_OF[room(b)] > FLOOR_OF[room(a)])
    assert not up, "upward imports (move the imported code down, or the importer up):\n" + "\n".join(up)


def test_the_stages_do_not_import_each_other():
    across = sorted(f"{a} imports {b}" for a, targets in import_graph().items() for b in targets
                    if room(a) != room(b) and FLOOR_OF.get(room(a)) == FLOOR_OF.get(room(b)) in SEPARATE_ROOMS)
    assert not across, "a stage imports another stage (share through a lower floor):\n" + "\n".join(across)


def test_no_modules_import_each_other_in_a_circle():
    assert not cycles(import_graph())


def test_the_circle_finder_finds_circles():
    """The check above can fail: a circle of three and one of two are found, a chain is not."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"e"}, "e": {"d", "a"}, "f": {"a"}}
    assert sorted(cycles(graph)) == [["a", "b", "c"], ["d", "e"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_the_picture_in_docs_matches_the_imports():
    text = DOC.read_text()
    assert BEGIN in text and END in text, f"{DOC} lost its picture's markers"
    drawn = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert drawn == picture(import_graph()), ("docs/architecture.md's picture is out of date. Fix: replace it "
                                              "with the output of `python3 tests/test_architecture.py`")


if __name__ == "__main__":
    sys.stdout.write(picture(import_graph()) + "\n")
