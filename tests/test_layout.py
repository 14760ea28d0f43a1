"""The repo's layout: library files below, scripts on top. README.md's file table is the one list
of which top-level file is which; these tests read the imports of every top-level .py file (a
function's lazy import too) and hold the code to it: no script imports a script, no library file
imports a script, no import circle, every file in the table, and a docstring saying its job."""
import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE_ROW = re.compile(r"^\| `([^`]+)` \| (library|script|page) \|", re.MULTILINE)  # | `train.py` | script | ... |

# Known exceptions, each removed by work under way; strict: the mark fails once the import is gone, so it goes too.
def file_table(readme=os.path.join(ROOT, "README.md")):
    """{file name: tier} from the rows of README.md's file table."""
    with open(readme, encoding="utf-8") as f:
        return dict(TABLE_ROW.findall(f.read()))


def top_level_modules(root=ROOT):
    return sorted(name[:-3] for name in os.listdir(root) if name.endswith(".py"))


def local_imports(path, modules):
    """The modules among `modules` that the file at path imports, wherever in the file.
    AssertionError on an import the graph cannot see (importlib, __import__)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            assert name not in ("__import__", "importlib.import_module"), \
                f"{os.path.basename(path)}:{node.lineno} imports by name ({name}), which this test cannot follow"
    return found & set(modules) - {os.path.basename(path)[:-3]}


def import_graph(root=ROOT):
    modules = top_level_modules(root)
    return {m: local_imports(os.path.join(root, m + ".py"), modules) for m in modules}


def find_circle(graph):
    """A list of modules [a, b, ..., a] that import each other in a circle, or None."""
    state = {}  # module -> "open" while on the path being walked, "done" after

    def visit(module, path):
        state[module] = "open"
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                return path[path.index(imported):] + [imported]
            if imported not in state and (circle := visit(imported, path + [imported])):
                return circle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (circle := visit(module, [module])):
            return circle
    return None


def scripts():
    return sorted(name[:-3] for name, tier in file_table().items() if tier == "script")


def test_file_table_names_every_file_with_its_tier():
    table = file_table()
    listed_py = {name for name in table if name.endswith(".py")}
    assert listed_py == {m + ".py" for m in top_level_modules()}, \
        "README.md's file table must name every top-level .py file, and only those"
    assert all(tier in ("library", "script") for name, tier in table.items() if name.endswith(".py"))
    for name in table:
        assert os.path.isfile(os.path.join(ROOT, name)), f"README.md's file table names {name}, which does not exist"
    assert table.get("chat.html") == "page"
    assert {"library", "script"} <= set(table.values())


@pytest.mark.parametrize("module", top_level_modules())
def test_every_file_says_its_job_in_a_docstring(module):
    with open(os.path.join(ROOT, module + ".py"), encoding="utf-8") as f:
        docstring = ast.get_docstring(ast.parse(f.read()))
    assert docstring and len(docstring.split()) >= 5, f"{module}.py needs a module docstring saying its job"


@pytest.mark.parametrize("script", scripts())
def test_a_script_imports_no_other_script(script):
    imported = import_graph()[script] & set(scripts())
    assert not imported, f"{script}.py imports the script(s) {', '.join(sorted(imported))}: share through a library file"


def test_no_library_file_imports_a_script():
    graph, tiers = import_graph(), file_table()
    wrong = {m: sorted(graph[m] & set(scripts())) for m in graph if tiers.get(m + ".py") == "library"}
    assert not any(wrong.values()), {m: s for m, s in wrong.items() if s}


def test_the_imports_have_no_circle():
    circle = find_circle(import_graph())
    assert circle is None, f"an import circle: {' -> '.join(circle)}"


def test_the_checks_see_lazy_imports_circles_and_imports_by_name(tmp_path):
    """The helpers above on a made-up repo: they must find what the real one should not have."""
    (tmp_path / "a.py").write_text('"""a"""\nimport os\nfrom b import f\n')
    (tmp_path / "b.py").write_text('"""b"""\ndef f():\n    import c.sub\n    from a import g\n')
    (tmp_path / "c.py").write_text('"""c"""\nimport numpy\n')
    (tmp_path / "d.py").write_text('"""d"""\nimport importlib\nimportlib.import_module("a")\n')
    graph = {m: local_imports(str(tmp_path / f"{m}.py"), ["a", "b", "c"]) for m in "abc"}
    assert graph == {"a": {"b"}, "b": {"a", "c"}, "c": set()}
    assert find_circle(graph) == ["a", "b", "a"]
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    with pytest.raises(AssertionError, match="d.py:3 imports by name"):
        local_imports(str(tmp_path / "d.py"), ["a", "b", "c", "d"])
    (tmp_path / "README.md").write_text("| file | tier | job |\n|---|---|---|\n| `a.py` | library | x |\n"
                                        "| `b.py` | script | y |\n| `chat.html` | page | z |\n")
    assert file_table(str(tmp_path / "README.md")) == {"a.py": "library", "b.py": "script", "chat.html": "page"}
