"""Split the repository into the installed library ``poslsh`` and the lab ``poslsh_lab`` (issue 24, items 1 and 4).

Run from a checkout's root (clean work tree), then review ``git status`` / ``git diff`` and run the tests:

    python3 tools/split_lab.py            # moves, rewrites, writes; prints every change
    python3 tools/split_lab.py --dry-run  # prints what it would do, changes nothing

Deterministic and idempotent: a second run finds nothing to move and nothing to rewrite. What it does:

1. ``git mv`` of the lab into ``poslsh_lab/`` (``MOVES``: every experiment found under
   ``poslsh/experiments/``, ``lm/``, ``util/``, ``readme.py``, ``cli.py``; ``integrations/cli.py`` as
   ``poslsh_lab/eval_hf.py``) and the renames of misleading library names (``kernels.py`` ->
   ``positional_kernels.py``, ``masks.py`` -> ``mask_errors.py``).
2. Imports of every ``.py`` file under poslsh/, poslsh_lab/, tests/, bench/ found with ``ast`` (lazy ones
   inside functions too) and rewritten to the new module names: a relative import that now crosses the
   package boundary becomes absolute, ``from PKG import a, b`` is split when a and b now live in
   different packages. Module paths named in strings and comments (tokenize: monkeypatch targets,
   ``importlib.import_module`` names, ``-m poslsh.cli`` command lines, docstrings) and dotted names in
   code (``poslsh.lm.model.X``) are rewritten by the same table, as are the Markdown docs, ``.ci/run``,
   ``bench/*.sh`` and ``pyproject.toml`` (the committed results under bench/results/ are data and stay).
3. Writes the deprecated aliases (``poslsh/_aliases.py``: one import hook that serves every old module
   name as the moved module itself, with a DeprecationWarning), ``poslsh_lab/__init__.py``, the new
   ``tests/test_layers.py`` and ``tests/test_package_split.py`` (templates beside this script in
   ``tools/split_lab/``), the package list, console script and package data of ``pyproject.toml``,
   docs/ARCHITECTURE.md's layer table and README.md's layout block.

Anything it cannot do it prints under "BY HAND" at the end (and exits 1).
"""

from __future__ import annotations

import argparse
import ast
import io
import re
import shutil
import subprocess
import sys
import tokenize
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parent / "split_lab"

LIB, LAB = "poslsh", "poslsh_lab"

# Old module name -> new module name (a prefix: poslsh.lm.model -> poslsh_lab.lm.model). The experiments
# folder moves whole, so any experiment that exists when this runs moves with it.
MOVES: dict[str, str] = {
    "poslsh.experiments": "poslsh_lab.experiments",
    "poslsh.lm": "poslsh_lab.lm",
    "poslsh.util": "poslsh_lab.util",
    "poslsh.readme": "poslsh_lab.readme",
    "poslsh.cli": "poslsh_lab.cli",
    "poslsh.integrations.cli": "poslsh_lab.eval_hf",
    # names that said the wrong thing (issue 24 item 4): positional kernels f(d), not GPU kernels;
    # the errors of the mean mask (claim 1), not attention masks
    "poslsh.kernels": "poslsh.positional_kernels",
    "poslsh.masks": "poslsh.mask_errors",
}

# Files never rewritten: the files whose job is to name the old modules (tools/ is never scanned), and the
# layer test, written whole from its template.
ALIAS_FILES = ("poslsh/_aliases.py", "tests/test_package_split.py", "tests/test_layers.py")

changes: list[str] = []
by_hand: list[str] = []


def log(msg: str) -> None:
    changes.append(msg)
    print(msg)


def new_name(module: str) -> str:
    """The module's name after the split (longest prefix of MOVES; unchanged if none)."""
    best = ""
    for old in MOVES:
        if (module == old or module.startswith(old + ".")) and len(old) > len(best):
            best = old
    return MOVES[best] + module[len(best):] if best else module


def scan_modules(root: Path) -> dict[str, Path]:
    """Module name -> file, for both packages as they are now."""
    found = {}
    for top in (LIB, LAB):
        for path in sorted((root / top).rglob("*.py")) if (root / top).is_dir() else []:
            parts = list(path.relative_to(root).with_suffix("").parts)
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


# ----------------------------------------------------------------------------------------------------------
# 1. moves
# ----------------------------------------------------------------------------------------------------------

def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout


def move(root: Path, dry: bool) -> dict[Path, str]:
    """git mv every tracked file of a moved module or folder; returns new .py file -> its module name before."""
    old_names: dict[Path, str] = {}
    tracked = git(root, "ls-files", "-z", "--", LIB).split("\0")
    for src in sorted(f for f in tracked if f):
        dest = _PATH.sub(lambda m: _PATHS[m.group(1)], src, count=1)
        if dest == src or not (root / src).exists():
            continue
        if src.endswith(".py"):
            parts = list(Path(src).with_suffix("").parts)
            old_names[Path(dest)] = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        log(f"git mv {src} {dest}")
        if not dry:
            (root / dest).parent.mkdir(parents=True, exist_ok=True)
            git(root, "mv", src, dest)
    if not dry:
        for folder in sorted((root / LIB).rglob("*"), key=lambda p: -len(p.parts)):
            if folder.is_dir() and all(c.name == "__pycache__" for c in folder.iterdir()):
                shutil.rmtree(folder)  # emptied by the moves (only bytecode left)
    return old_names


# ----------------------------------------------------------------------------------------------------------
# 2. rewrites
# ----------------------------------------------------------------------------------------------------------

_DOTTED = re.compile(r"(?<![\w.])(" + "|".join(re.escape(m) for m in sorted(MOVES, key=len, reverse=True))
                     + r")(?![\w])")
_PATHS = {"poslsh/" + old.split(".", 1)[1].replace(".", "/"): new.replace(".", "/") for old, new in MOVES.items()}
_PATH = re.compile(r"(?<![\w/.])(" + "|".join(re.escape(p) for p in sorted(_PATHS, key=len, reverse=True))
                   + r")(?=/|\.py\b)")


def rewrite_text(text: str) -> str:
    """Module paths (dotted and as file paths) in free text: docs, strings, comments."""
    text = _DOTTED.sub(lambda m: MOVES[m.group(1)], text)
    return _PATH.sub(lambda m: _PATHS[m.group(1)], text)


class Source:
    """A file's text with edits keyed by (line, column in characters); applied from the end."""

    def __init__(self, text: str):
        self.text = text
        self.lines = text.splitlines(keepends=True)
        self.starts = [0]
        for line in self.lines:
            self.starts.append(self.starts[-1] + len(line))
        self.edits: list[tuple[int, int, str]] = []

    def offset(self, line: int, col: int, utf8: bool = False) -> int:
        if utf8:
            col = len(self.lines[line - 1].encode()[:col].decode())
        return self.starts[line - 1] + col

    def node_span(self, node: ast.AST) -> tuple[int, int]:
        return (self.offset(node.lineno, node.col_offset, utf8=True),
                self.offset(node.end_lineno, node.end_col_offset, utf8=True))

    def apply(self) -> str:
        text = self.text
        for start, end, new in sorted(self.edits, reverse=True):
            text = text[:start] + new + text[end:]
        return text


def resolve_from(node: ast.ImportFrom, module: str | None, is_package: bool) -> str | None:
    """The absolute module ``from ... import`` names, in the layout ``module`` had (None: not poslsh)."""
    if node.level:
        if module is None:
            return None
        package = module if is_package else module.rpartition(".")[0]
        base = package.split(".")
        if node.level - 1 > len(base) - 1:
            return None
        base = base[:len(base) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))
    return node.module


def relative_spec(target: str, module: str, is_package: bool) -> str | None:
    """``target`` as a relative import from ``module`` (None when they are in different top packages)."""
    package = (module if is_package else module.rpartition(".")[0]).split(".")
    parts = target.split(".")
    if parts[0] != package[0]:
        return None
    common = 0
    while common < min(len(package), len(parts)) and package[common] == parts[common]:
        common += 1
    level = len(package) - common + 1
    return "." * level + ".".join(parts[common:])


def _names_text(aliases: list[ast.alias], renamed: dict[str, str], unbound: set[str]) -> str:
    """The names of a ``from`` import; a renamed module keeps its old binding (``new as old``) unless in
    ``unbound``."""
    out = []
    for a in aliases:
        name = renamed.get(a.name, a.name)
        bound = a.asname or (a.name if name != a.name and name not in unbound else None)
        out.append(name + (f" as {bound}" if bound and bound != name else ""))
    return ", ".join(out)


def rewrite_imports(src: Source, tree: ast.AST, old_module: str | None, new_module: str | None,
                    is_package: bool, known: set[str], where: str) -> list[tuple[int, int]]:
    """Record an edit for every import that names a moved module; returns the spans of all imports."""
    spans = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            spans.append(src.node_span(node))
            if not any(a.name.split(".")[0] == LIB and new_name(a.name) != a.name for a in node.names):
                continue
            parts = []
            for a in node.names:
                name = new_name(a.name)
                parts.append(name + (f" as {a.asname}" if a.asname else ""))
                if name != a.name and not a.asname and name.split(".")[0] != a.name.split(".")[0]:
                    by_hand.append(f"{where}:{node.lineno}: `import {a.name}` now binds {name.split('.')[0]}; "
                                   f"check the uses of {a.name.split('.')[0]} below it")
            new = "import " + ", ".join(parts)
            start, end = src.node_span(node)
            log(f"{where}:{node.lineno}: {src.text[start:end]!s}  ->  {new}")
            src.edits.append((start, end, new))
        elif isinstance(node, ast.ImportFrom):
            spans.append(src.node_span(node))
            target = resolve_from(node, old_module, is_package)
            if target is None or target.split(".")[0] not in (LIB, LAB):
                continue
            # Where each name now comes from: a submodule moves on its own, an attribute with its module.
            groups: dict[str, list[ast.alias]] = {}
            renamed: dict[str, str] = {}
            keep_binding: set[str] = set()
            for a in node.names:
                sub = f"{target}.{a.name}"
                if sub in known:
                    dest = new_name(sub)
                    parent, _, last = dest.rpartition(".")
                    if last != a.name:
                        renamed[a.name] = last
                        if where == f"{LIB}/__init__.py":  # the package's attributes take the new names;
                            keep_binding.add(last)     # the old ones come from its __getattr__
                    groups.setdefault(parent, []).append(a)
                else:
                    groups.setdefault(new_name(target), []).append(a)
            here = new_module
            statements = []
            for dest, aliases in groups.items():
                spec = None
                if node.level and here is not None:
                    spec = relative_spec(dest, here, is_package)
                    if spec is not None and resolve_from(ast.ImportFrom(module=spec.lstrip(".") or None,
                                                                        level=len(spec) - len(spec.lstrip(".")),
                                                                        names=[]), here, is_package) != dest:
                        spec = None
                statements.append((spec or dest, aliases))
            original_spec = "." * node.level + (node.module or "")
            if len(statements) == 1 and statements[0][0] == original_spec and not renamed:
                continue  # resolves to the same module where it now is
            start, end = src.node_span(node)
            old_text = src.text[start:end]
            if len(statements) == 1 and not renamed:
                # Keep the names as written (parentheses, line breaks): replace only "from X".
                head = re.match(r"from\s+[.\w]*\s+import\b", old_text)
                new = f"from {statements[0][0]} import" + old_text[head.end():]
            else:
                indent = " " * len(src.lines[node.lineno - 1].encode()[:node.col_offset].decode())
                new = ("\n" + indent).join(f"from {spec} import {_names_text(aliases, renamed, keep_binding)}"
                                           for spec, aliases in statements)
            log(f"{where}:{node.lineno}: {old_text}  ->  {new}")
            src.edits.append((start, end, new))
    return spans


def rewrite_tokens(src: Source, import_spans: list[tuple[int, int]], where: str) -> None:
    """Strings and comments: module paths as text. Code: dotted names ``poslsh.lm.x`` (outside imports)."""
    def inside_import(pos: int) -> bool:
        return any(a <= pos < b for a, b in import_spans)

    tokens = list(tokenize.generate_tokens(io.StringIO(src.text).readline))
    for i, tok in enumerate(tokens):
        start = src.offset(*tok.start)
        if tok.type in (tokenize.STRING, tokenize.COMMENT):
            if inside_import(start):
                continue
            new = rewrite_text(tok.string)
            if new != tok.string:
                log(f"{where}:{tok.start[0]}: {tok.string.strip()[:100]!r} -> {new.strip()[:100]!r}"
                    if len(tok.string) < 100 else f"{where}:{tok.start[0]}: text: "
                    + "; ".join(sorted(set(m.group(0) for m in _DOTTED.finditer(tok.string))
                                       | set(m.group(0) for m in _PATH.finditer(tok.string)))) + " rewritten")
                src.edits.append((start, src.offset(*tok.end), new))
        elif tok.type == tokenize.NAME and tok.string == LIB and not inside_import(start):
            if i and tokens[i - 1].type == tokenize.OP and tokens[i - 1].string == ".":
                continue
            # the longest dotted chain poslsh.a.b.c starting here
            j, dotted = i, LIB
            while (j + 2 < len(tokens) and tokens[j + 1].string == "." and tokens[j + 2].type == tokenize.NAME):
                dotted += "." + tokens[j + 2].string
                j += 2
            moved = new_name(dotted)
            if moved != dotted:
                end = src.offset(*tokens[j].end)
                log(f"{where}:{tok.start[0]}: {dotted} -> {moved}")
                src.edits.append((start, end, moved))


def rewrite_python(root: Path, path: Path, old_names: dict[Path, str], known: set[str]) -> str | None:
    rel = path.relative_to(root)
    text = path.read_text()
    tree = ast.parse(text, str(rel))
    is_package = path.name == "__init__.py"
    new_module = None
    if rel.parts[0] in (LIB, LAB):
        parts = list(rel.with_suffix("").parts)
        new_module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    old_module = old_names.get(rel, new_module)
    src = Source(text)
    spans = rewrite_imports(src, tree, old_module, new_module, is_package, known, str(rel))
    rewrite_tokens(src, spans, str(rel))
    new = src.apply()
    if new == text:
        return None
    ast.parse(new, str(rel))  # the rewrite must leave valid Python
    return new


def python_files(root: Path) -> list[Path]:
    files = []
    for top in (LIB, LAB, "tests", "bench"):
        if (root / top).is_dir():
            files += [p for p in sorted((root / top).rglob("*.py")) if "__pycache__" not in p.parts]
    return [p for p in files if str(p.relative_to(root)) not in ALIAS_FILES]


def text_files(root: Path) -> list[Path]:
    found = [root / "README.md", root / "pyproject.toml", root / ".ci" / "run"]
    found += sorted((root / "docs").glob("*.md")) + sorted((root / "bench").glob("*.md"))
    found += sorted((root / "bench").glob("*.sh"))
    return [p for p in found if p.is_file()]


# ----------------------------------------------------------------------------------------------------------
# 3. new files and targeted edits
# ----------------------------------------------------------------------------------------------------------

def write_template(root: Path, name: str, dest: str, dry: bool) -> None:
    text = (TEMPLATES / name).read_text()
    target = root / dest
    if target.is_file() and target.read_text() == text:
        return
    log(f"write {dest} (from tools/split_lab/{name})")
    if not dry:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        git(root, "add", dest)  # new files are tracked, so ``git commit -a`` takes the whole split


def edit(root: Path, rel: str, old: str, new: str, dry: bool, what: str) -> None:
    """Replace ``old`` by ``new`` once in ``rel`` (nothing if ``new`` is there already; BY HAND if neither)."""
    path = root / rel
    text = path.read_text()
    if new in text and (old not in text or old in new):
        return
    if text.count(old) != 1:
        by_hand.append(f"{rel}: {what} (expected text not found once: {old[:80]!r}...)")
        return
    log(f"{rel}: {what}")
    if not dry:
        path.write_text(text.replace(old, new))


def replace_section(root: Path, rel: str, start: str, end: str, body: str, dry: bool, what: str) -> None:
    """Replace the text between the line ``start`` and the next line ``end`` (both kept) by ``body``."""
    path = root / rel
    text = path.read_text()
    i = text.find(start)
    j = text.find(end, i + len(start)) if i >= 0 else -1
    if i < 0 or j < 0:
        by_hand.append(f"{rel}: {what} (markers {start!r} .. {end!r} not found)")
        return
    new = text[:i + len(start)] + body + text[j:]
    if new != text:
        log(f"{rel}: {what}")
        if not dry:
            path.write_text(new)


def edit_init(root: Path, dry: bool) -> None:
    """poslsh/__init__.py: the import hook of the old names first; the old attributes kernels/masks lazily."""
    rel = "poslsh/__init__.py"
    text = (root / rel).read_text()
    doc_end = ast.parse(text).body[0].end_lineno
    lines = text.splitlines(keepends=True)
    hook = "from . import _aliases  # noqa: F401 - first: the old names of moved modules keep working (deprecated)\n"
    if hook not in text:
        lines.insert(doc_end + 1, hook)
        log(f"{rel}: installs the deprecated-alias import hook")
    text = "".join(lines)
    text = re.sub(r'"kernels", "masks"', '"positional_kernels", "mask_errors"', text)
    getattr_block = '''

def __getattr__(name: str):
    """The old attribute names of renamed modules (deprecated, see ``_aliases.MOVED``)."""
    return _aliases.old_attribute(__name__, name)
'''
    if "def __getattr__" not in text:
        text = text.rstrip("\n") + "\n" + getattr_block
        log(f"{rel}: __getattr__ serves the old attribute names with a DeprecationWarning")
    if not dry:
        (root / rel).write_text(text)


README_LAYOUT = """```
poslsh/                the installed library (`import poslsh` needs torch, numpy, tqdm only)
  __init__.py          the public names: attention, flash_attn_func, MethodSpec, nn, theory, ...
  alibi.py positional_kernels.py hashing.py layer_partitions.py   slopes, kernels f(d), the two schemes
  mask_errors.py theory.py   the paper's claims: errors of the mean mask, the bounds (docs/MATH.md)
  method.py            one description of a method and its options (parse, label, validate)
  attention/           dispatch (one entry point, speed table), reference, fused, split + primitives,
                       ranges (every tile's keys), flex, triton/ (jit helpers, forward, backward, launch)
  flash.py             FlashAttention-2's interface over poslsh.attention
  nn.py                ALiBiAttention module
  distributed/         context parallelism: halo exchange (window, lsh, hybrid), exact ring, plan, launcher
  integrations/        transformers (BLOOM, MPT, Falcon-alibi): patch_model
poslsh_lab/            the lab: the paper's experiments and this repository's tools (not needed to use poslsh)
  cli.py               the `poslsh` command
  experiments/         each claim as an experiment -> JSON + PNG (design / measure / report)
  lm/                  small ALiBi language model: data, trainer, evaluation
  eval_hf.py           `poslsh eval-hf`: perplexity of a transformers checkpoint per method
  readme.py            the README's results block and docs/RESULTS.md, from the committed JSON
  util/                results files, tables, plots, flags
bench/                 GPU scripts (bench/h200_session3.sh and h200_session4.sh: the H200 calls behind the results), notes,
                       committed results
```
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="print what would change, change nothing")
    ap.add_argument("--root", type=Path, default=Path.cwd(), help="the checkout (default: the current folder)")
    args = ap.parse_args()
    root, dry = args.root.resolve(), args.dry_run
    if not (root / "pyproject.toml").is_file() or not (root / LIB).is_dir():
        print(f"{root} is not a poslsh checkout (no pyproject.toml and poslsh/)", file=sys.stderr)
        return 2

    known = set(scan_modules(root))
    old_names = move(root, dry)
    if dry:  # later steps read the files where they now are
        print("(dry run: the rewrites below are not shown; run on a scratch clone to see them)")
        return 0
    known |= set(scan_modules(root))

    for path in python_files(root):
        new = rewrite_python(root, path, old_names, known)
        if new is not None:
            path.write_text(new)
    for path in text_files(root):
        text = path.read_text()
        new = rewrite_text(text)
        if new != text:
            for line_no, (a, b) in enumerate(zip(text.splitlines(), new.splitlines()), 1):
                if a != b:
                    log(f"{path.relative_to(root)}:{line_no}: {a.strip()[:110]}  ->  {b.strip()[:110]}")
            path.write_text(new)

    write_template(root, "aliases.py", "poslsh/_aliases.py", dry)
    write_template(root, "lab_init.py", "poslsh_lab/__init__.py", dry)
    write_template(root, "test_layers.py", "tests/test_layers.py", dry)
    write_template(root, "test_package_split.py", "tests/test_package_split.py", dry)
    edit_init(root, dry)

    # pyproject: both packages, the library's data files (the lab reads none of its own).
    edit(root, "pyproject.toml", 'include = ["poslsh*"]',
         'include = ["poslsh", "poslsh.*", "poslsh_lab", "poslsh_lab.*"]\n\n'
         '[tool.setuptools.package-data]\n'
         'poslsh = ["attention/speed_table.json", "attention/triton/tuned.json"]  # read at import by speed.py, launch.py',
         dry, "packages: poslsh and poslsh_lab; the library's JSON tables as package data")

    # docs: the layer table (tests/test_docs.py reads it against tests/test_layers.py) and where new work goes.
    replace_section(root, "docs/ARCHITECTURE.md", "## The layers\n", "Two rules hold across layers.",
                    (TEMPLATES / "architecture_layers.md").read_text(), dry, "the layer table of the two packages")
    edit(root, "docs/ARCHITECTURE.md", "## Where new work goes\n\n",
         "## Where new work goes\n\n" + (TEMPLATES / "architecture_where.md").read_text(), dry,
         "where new work goes: which package")
    rel = "docs/ARCHITECTURE.md"
    text = (root / rel).read_text()
    new = re.sub(r"`(experiments|lm|util)/", r"`poslsh_lab/\1/", text)  # folders named from the old package root
    new = re.sub(r"`(cli\.EXPERIMENTS|readme\.Section)`", r"`poslsh_lab.\1`", new)
    new = new.replace("in `kernels.py`", "in `positional_kernels.py`")
    if new != text:
        log(f"{rel}: the lab's folders named as poslsh_lab/...")
        (root / rel).write_text(new)
    edit(root, "tests/test_docs.py",
         '    documented = [(name.strip(), sorted("poslsh" if m == "poslsh/__init__" else "poslsh." + m.rstrip("/")\n'
         '                                        for m in re.findall(r"`([^`]+)`", modules)))\n',
         '    documented = [(name.strip(), sorted(re.findall(r"`([^`]+)`", modules)))\n',
         dry, "the layer table names modules in full")
    edit(root, "tests/test_docs.py", '    for path in sorted((ROOT / "poslsh").rglob("*.py")):\n',
         '    for path in sorted([*(ROOT / "poslsh").rglob("*.py"), *(ROOT / "poslsh_lab").rglob("*.py")]):\n',
         dry, "the lab's docstrings are checked too")
    edit(root, "poslsh/integrations/__init__.py",
         "* ``poslsh_lab.eval_hf``: the ``poslsh eval-hf`` subcommand.\n",
         "* ``poslsh eval-hf``, which scores a checkpoint with the patch, is the lab's (``poslsh_lab.eval_hf``).\n",
         dry, "the eval-hf command is no longer part of the package")
    replace_section(root, "README.md", "## Layout\n\n", "\n[docs/ARCHITECTURE.md]", README_LAYOUT, dry,
                    "the layout block: two packages")

    # leftovers: a library module that imports the lab (other than the aliases) is a layering error
    for module, path in sorted(scan_modules(root).items()):
        if module.split(".")[0] != LIB or str(path.relative_to(root)) in ALIAS_FILES:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(n.split(".")[0] == LAB for n in names):
                by_hand.append(f"{path.relative_to(root)}:{node.lineno}: the library imports the lab ({names})")
    leftovers = subprocess.run(["git", "grep", "-nE", r"(^|[^\w.])poslsh\.(experiments|lm|util|readme|cli|kernels|"
                                r"masks|integrations\.cli)\b", "--", ".", ":!bench/results", ":!tools",
                                *[f":!{f}" for f in ALIAS_FILES]],
                               cwd=root, capture_output=True, text=True).stdout
    by_hand.extend(f"old name left: {line}" for line in leftovers.splitlines())

    print(f"\n{len(changes)} changes.")
    if by_hand:
        print("BY HAND:\n  " + "\n  ".join(by_hand))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
