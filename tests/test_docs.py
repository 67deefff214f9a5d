"""Docs that cannot go stale (issue 39): README.md and docs/*.md are checked against the code they describe.

- every command line that calls one of the tools (train.py, forecast.py, flops.py, report.py, demo.py, bench/*.py,
  `python -m <module>` of this project), in a code block or an inline code span, uses only flags that tool's own
  argparse parser knows (the parser its main() parses with: train.py's includes the --plan job flags);
- every option of every tool's parser is named somewhere in the docs (a flag's meaning is two clicks from the README);
- every key a plan may hold is named in docs/studies.md or docs/search.md;
- every ```toml block parses with the plan reader (`study.plan.load_plan`) unless its first line is `# fragment`, and
  so does every file in plans/;
- every relative path a doc names (a link, or an inline code span that looks like a path: a / under a top-level entry
  of the repository, or a known file extension) exists, except what runs create (paths under runs/ and the like, or
  with a <placeholder>) and the users' own data file; a link's #anchor names a heading of its page;
- a number quoted from a run names the command and the date that produced it: every results table (a row with two
  or more cells that are a decimal number alone) has, within the RESULT_CONTEXT lines above it and not past a `## `
  heading (a quoted table: above its quote), a tool's command line in code and a date 2026-MM-DD; a table of
  reference numbers opts out with the line `<!-- not a measurement -->` (text may follow) right above it.

Each checker is a function from a document to the list of its faults; the tests run each on the real docs and on a
small made-up document with one fault, which the checker must report. No model is loaded: the parsers are built by
calling each tool's main() with argparse's parse_args intercepted.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# The tools: a script's name as it is typed -> the module whose main() parses its flags.
SCRIPTS = {"train.py": "train", "forecast.py": "forecast", "flops.py": "flops", "report.py": "report",
           "demo.py": "demo", "bench/bench.py": "bench.bench", "bench/gpu_check.py": "bench.gpu_check"}
# `python -m MODULE` tools of this project; a module without a main() yet is skipped.
MODULES = ("data.lotka_volterra", "data.synthetic", "data.llmtime", "models.recipe")
FIRST_PARTY = ("accounting", "bench", "common", "data", "forecasting", "ledger", "lora", "models", "qwen_mini",
               "reporting", "study", "training")
SHELL_BLOCKS = ("", "bash", "sh", "shell", "console", "text")

# Paths that runs create or users bring, which the repository does not hold.
OUTPUT_ROOTS = ("runs", "runs_mine", "runs_users", "runs_search", "runs_study", "forecasts", "OUT", "out", "handin",
                "report_figures")
OUTPUT_NAMES = ("config.json", "metrics.jsonl", "metrics.json", "flops.json", "ledger.json", "study.json",
                "report.md", "samples.npz", "per_trajectory.csv", "checkpoint.pt", "loss_curve.png", "summary.json",
                "summary.md", "log.txt", "machine.json", "pytest_gpu.json", "train.json", "forecast.json",
                "jobs.json", "error_vs_horizon.png", "error_distribution.png", "budget.png", "recipe.json",
                "adapter_config.json", "adapter_model.safetensors", "model.safetensors", "tokenizer.json",
                "lotka_volterra_data.h5", "*.lock")
OUTPUT_PATTERNS = (r"trajectory_\d+\.png", r"search_\w+\.png", r"results\.json")
EXTENSIONS = ("py", "md", "toml", "json", "jsonl", "h5", "png", "txt", "csv", "npz", "safetensors", "pt", "lock",
              "cfg", "ini", "yml", "yaml", "sh")
STUDY_PAGES = ("docs/studies.md", "docs/search.md")  # where every plan key is named
RESULT_CONTEXT = 15  # lines above a results table that must name its command and date
OPT_OUT = "<!-- not a measurement"

FENCE = re.compile(r"^\s*(```|~~~)\s*([\w+-]*)")
SPAN = re.compile(r"(?<!`)`([^`\n]+(?:\n[^`\n]+)*)`(?!`)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
DATE = re.compile(r"\b20\d\d-\d\d-\d\d\b")
NUMBER_CELL = re.compile(r"^[-+x]?\d[\d,]*(\.\d+)?(e[-+]?\d+)?(\s?%|\s?s|x)?$")


# ---- reading a Markdown document -----------------------------------------------------------------------------------

def blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """The fenced code blocks: (language, first line number, lines)."""
    out, current = [], None
    for number, line in enumerate(text.splitlines(), start=1):
        fence = FENCE.match(line)
        if current is None and fence:
            current = (fence.group(2).lower(), number + 1, [])
        elif current is not None and line.strip().startswith(("```", "~~~")):
            out.append(current)
            current = None
        elif current is not None:
            current[2].append(line)
    return out


def prose(text: str) -> str:
    """The text outside code blocks (their lines blanked, so line numbers stay)."""
    lines, inside = [], False
    for line in text.splitlines():
        if FENCE.match(line) or (inside and line.strip().startswith(("```", "~~~"))):
            inside = not inside
            lines.append("")
        else:
            lines.append("" if inside else line)
    return "\n".join(lines)


def spans(text: str) -> list[str]:
    """The inline code spans of the prose (a span may wrap over lines within a paragraph)."""
    return [" ".join(s.split()) for s in SPAN.findall(re.sub(r"\n\s*\n", "\n\n\x00\n\n", prose(text)))
            if "\x00" not in s]


def command_lines(text: str) -> list[str]:
    """Every command line of the shell code blocks, continuation lines joined and trailing comments cut, and every
    inline code span."""
    lines = []
    for language, _, body in blocks(text):
        if language not in SHELL_BLOCKS:
            continue
        joined = ""
        for line in body:
            line = re.sub(r"(^|\s)#.*$", "", line.removeprefix("$ ")).rstrip()
            if line.endswith("\\"):
                joined += line[:-1] + " "
                continue
            lines.append(joined + line)
            joined = ""
        if joined:
            lines.append(joined)
    return lines + spans(text)


def invocations(line: str) -> list[tuple[str, list[str]]]:
    """(tool, its argument tokens) for every tool a command line calls: a script of SCRIPTS, or `-m MODULE` of
    this project."""
    found = []
    for segment in re.split(r"&&|\|\||;|\|", line):
        tokens = [t.strip("\"'()[],") for t in segment.split()]
        for i, token in enumerate(tokens):
            name = token.removeprefix("./")
            if name in SCRIPTS:
                found.append((name, tokens[i + 1:]))
                break
            if token == "-m" and i + 1 < len(tokens) and tokens[i + 1].split(".")[0] in FIRST_PARTY:
                found.append((tokens[i + 1], tokens[i + 2:]))
                break
    return found


# ---- the tools' parsers --------------------------------------------------------------------------------------------

class _Parsed(BaseException):  # not an Exception: no tool's `except Exception` catches it
    def __init__(self, parser):
        super().__init__()
        self.parser = parser


@functools.cache
def tool_parser(tool: str) -> argparse.ArgumentParser | None:
    """The parser the tool's main() parses its command line with (None: a module without a main()). Built by calling
    main([]) with parse_args intercepted, so nothing runs."""
    module_name = SCRIPTS.get(tool, tool)
    if tool not in SCRIPTS and tool not in MODULES:
        raise KeyError(f"{tool}: not one of the project's tools ({', '.join([*SCRIPTS, *MODULES])})")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError:
        return None
    if not hasattr(module, "main"):
        return None

    def intercept(self, *args, **kwargs):
        raise _Parsed(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", intercept)
        patch.setattr(argparse.ArgumentParser, "parse_known_args", intercept)
        try:
            module.main([])
        except _Parsed as parsed:
            return parsed.parser
    raise AssertionError(f"{tool}: main() returned without parsing a command line")


def known_options(parser: argparse.ArgumentParser, tokens: list[str]) -> set[str]:
    """The option strings the command line may use: the parser's, and a chosen subcommand's."""
    options = set(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = next((t for t in tokens if t in action.choices), None)
            if chosen is not None:
                options |= set(action.choices[chosen]._option_string_actions)
    return options


def documented_options(parser: argparse.ArgumentParser) -> list[str]:
    """Every long option a user may type: the parser's (and its subcommands'), without --help and hidden ones."""
    options = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                options += documented_options(sub)
        elif action.help != argparse.SUPPRESS:
            options += [o for o in action.option_strings if o.startswith("--") and o != "--help"]
    return options


# ---- the checkers --------------------------------------------------------------------------------------------------

def unknown_flags(text: str, where: str = "") -> list[str]:
    """Flags that the tool a command line calls does not take."""
    faults = []
    for line in command_lines(text):
        for tool, tokens in invocations(line):
            parser = tool_parser(tool)
            if parser is None:
                continue
            options = known_options(parser, tokens)
            for token in tokens:
                if token == "--":
                    break
                flag = token.split("=", 1)[0]
                if flag.startswith("-") and len(flag) > 1 and not re.match(r"-\.?\d", flag) and flag not in options:
                    faults.append(f"{where}: {tool} has no flag {flag}: {line.strip()}")
    return faults


def undocumented_flags(texts: list[str], tools=(*SCRIPTS, *MODULES)) -> list[str]:
    """Options of the tools that no doc names in code."""
    code = "\n".join("\n".join(command_lines(t)) + "\n" + "\n".join(spans(t)) for t in texts)
    faults = []
    for tool in tools:
        parser = tool_parser(tool)
        for option in documented_options(parser) if parser is not None else []:
            if not re.search(re.escape(option) + r"(?![\w-])", code):
                faults.append(f"{tool} {option}: not named in README.md or docs/")
    return faults


def undocumented_plan_keys(texts: list[str]) -> list[str]:
    """Plan keys (every table's, and a stage's own) that the study pages do not name in code."""
    from study.halving import SEARCH_KEYS
    from study.plan import FORECAST_KEYS, STUDY_KEYS, TRAIN_KEYS

    code = "\n".join(" ".join(spans(t)) for t in texts)
    keys = {"[study]": STUDY_KEYS, "[train]": TRAIN_KEYS, "[forecast]": FORECAST_KEYS, "search": SEARCH_KEYS,
            "[[stage]]": ("name", "from", "forecast", "which")}
    return [f"{table} {key}: not named in {' or '.join(STUDY_PAGES)}" for table, names in keys.items()
            for key in names if not re.search(rf"(?<![\w-]){re.escape(key)}(?![\w-])", code)]


def unparsable_plans(text: str, where: str, tmp_path: Path) -> list[str]:
    """```toml blocks that the plan reader refuses (unless their first line is `# fragment`)."""
    from study.plan import PlanError, load_plan

    faults = []
    for language, number, body in blocks(text):
        if language != "toml" or (body and body[0].strip().startswith("# fragment")):
            continue
        plan = tmp_path / f"block_{number}.toml"
        plan.write_text("\n".join(body) + "\n")
        try:
            load_plan(plan, runs_dir=tmp_path / "runs")
        except PlanError as e:
            faults.append(f"{where}:{number}: the plan does not parse: {e}")
    return faults


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*)$", prose(path.read_text()), re.M)}


@functools.cache
def repo_names(root: Path) -> frozenset[str]:
    """The names of every file and directory in the repository (not in .git, .venv, runs or caches)."""
    skip = {".git", ".venv", "runs", "__pycache__", ".pytest_cache", ".ruff_cache"}
    names = set()
    for _, subdirectories, files in os.walk(root):
        subdirectories[:] = [d for d in subdirectories if d not in skip]
        names.update(subdirectories + files)
    return frozenset(names)


def expand(path: str) -> list[str]:
    """bench/x_{a,b}.json -> bench/x_a.json, bench/x_b.json (one brace group)."""
    group = re.search(r"\{([^{}]*,[^{}]*)\}", path)
    if not group:
        return [path]
    return [path[:group.start()] + choice + path[group.end():] for choice in group.group(1).split(",")]


def is_output(path: str) -> bool:
    parts = path.strip("/").split("/")
    return parts[0] in OUTPUT_ROOTS or parts[-1] in OUTPUT_NAMES or any(re.fullmatch(p, parts[-1])
                                                                         for p in OUTPUT_PATTERNS)


def missing_paths(text: str, doc: Path, root: Path = ROOT) -> list[str]:
    """Relative paths (links, and inline code spans that look like paths) that do not exist."""
    faults = []
    top = {p.name for p in root.iterdir()}
    for target in LINK.findall(prose(text)):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        page = (doc.parent / file) if file else doc
        if not page.exists():
            faults.append(f"{doc.name}: link to {target}: no such file")
        elif anchor and page.suffix == ".md" and anchor not in anchors(page):
            faults.append(f"{doc.name}: link to {target}: {page.name} has no heading #{anchor}")
    for span in spans(text):
        if " " in span or re.search(r"[<>$%|]", span) or span.startswith(("/", "~", "../shared", "http")):
            continue
        path = span.rstrip(".,:;")
        first, extension = path.split("/")[0], path.rsplit(".", 1)[-1] if "." in path.split("/")[-1] else ""
        if not (extension in EXTENSIONS or ("/" in path and first in top)) or is_output(path):
            continue
        for candidate in expand(path):
            if "/" in candidate.rstrip("/"):
                found = any(root.glob(candidate.strip("/"))) if "*" in candidate else (root / candidate).exists()
            else:
                name = candidate.rstrip("/")
                found = any(re.fullmatch(name.replace(".", r"\.").replace("*", ".*"), n) for n in repo_names(root))
            if not found:
                faults.append(f"{doc.name}: `{span}`: no such path in the repository")
    return faults


def tables(text: str) -> list[tuple[int, list[list[str]]]]:
    """(index of its first line, body rows' cells) of every Markdown table, blockquoted ones included."""
    lines = [re.sub(r"^>\s?", "", line) for line in text.splitlines()]
    out, i = [], 0
    while i < len(lines):
        if lines[i].lstrip().startswith("|") and i + 1 < len(lines) and re.match(r"^\s*\|[\s:|-]+\|\s*$",
                                                                                  lines[i + 1]):
            start, i = i, i + 2
            rows = []
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                rows.append([c.strip().strip("*").strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            out.append((start, rows))
        else:
            i += 1
    return out


def unsourced_results(text: str, where: str = "") -> list[str]:
    """Results tables without a command and a date in the lines above them."""
    lines, prose_lines = text.splitlines(), prose(text).splitlines()
    code_lines = {n + k for _, n, body in blocks(text) for k in range(len(body))}  # 1-based line numbers in code
    faults = []
    for start, rows in tables(text):
        while start > 0 and lines[start - 1].startswith(">"):  # a quoted table: what stands above the quote
            start -= 1
        if max(sum(bool(NUMBER_CELL.match(c) and re.search(r"[.e]\d", c)) for c in row) for row in rows) < 2:
            continue  # a results table has a row of two or more measured numbers; a flag table one default a row
        above = lines[max(0, start - RESULT_CONTEXT):start]
        written = [line.strip() for line in above if line.strip()]
        if written and written[-1].startswith(OPT_OUT):
            continue
        window = []
        for offset, line in enumerate(reversed(above)):
            window.append((start - offset, line))  # start - offset: 1-based number of this line
            if line.startswith("## "):
                break
        context = "\n".join(line for _, line in reversed(window))
        words = "\n".join(prose_lines[number - 1] for number, _ in reversed(window))  # the code blocks blanked
        commands = [line for number, line in window if number in code_lines] + spans(words)
        has_command = any(invocations(c) for c in commands)
        if not (has_command and DATE.search(context)):
            missing = " and ".join(w for w, ok in (("a command", has_command), ("a date", DATE.search(context)))
                                   if not ok)
            faults.append(f"{where}:{start + 1}: a results table ({rows[0][0]!r}, ...) without {missing} in the "
                          f"{RESULT_CONTEXT} lines above it")
    return faults


# ---- the tests -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def docs():
    assert (ROOT / "docs").is_dir() and len(DOCS) >= 7, "README.md and docs/*.md"
    return {path: path.read_text() for path in DOCS}


def test_the_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines: the rest belongs in docs/"


def test_every_command_in_the_docs_uses_only_flags_its_tool_knows(docs):
    faults = [f for path, text in docs.items() for f in unknown_flags(text, path.name)]
    assert not faults, "\n".join(faults)


def test_a_made_up_flag_is_reported():
    doc = """Train it:

```bash
python train.py --rank 8 --ctx 768 \\
    --learning-rate 1e-4          # the real flag is --lr
torchrun --nproc_per_node 2 train.py --plan plans/demo.toml --jobs 2 --gpus 0,1
```

Then `forecast.py --run runs/x --samples 5` and `python -m data.lotka_volterra --simulate --out x.h5 --prior lv`.
"""
    faults = unknown_flags(doc, "made-up.md")
    assert len(faults) == 2, faults
    assert "train.py has no flag --learning-rate" in faults[0] and "forecast.py has no flag --samples" in faults[1]


def test_every_flag_of_every_tool_is_named_in_the_docs(docs):
    faults = undocumented_flags(list(docs.values()))
    assert not faults, "\n".join(faults)


def test_a_flag_no_doc_names_is_reported():
    faults = undocumented_flags(["`python report.py runs --out x`"], tools=("report.py",))
    assert faults == ["report.py --max-flops: not named in README.md or docs/",
                      "report.py --seed: not named in README.md or docs/"]


def test_every_plan_key_is_named_in_the_study_pages():
    faults = undocumented_plan_keys([(ROOT / page).read_text() for page in STUDY_PAGES])
    assert not faults, "\n".join(faults)


def test_a_plan_key_no_study_page_names_is_reported():
    faults = undocumented_plan_keys(["`[study]` takes `name`, `runs_dir` and `max_flops`; a stage `from` ..."])
    assert "[study] gqa: not named in docs/studies.md or docs/search.md" in faults
    assert "[study] name: not named in docs/studies.md or docs/search.md" not in faults
    assert "[train] lr: not named in docs/studies.md or docs/search.md" in faults


def test_every_plan_in_the_docs_and_in_plans_parses(docs, tmp_path):
    faults = [f for path, text in docs.items() for f in unparsable_plans(text, path.name, tmp_path)]
    from study.plan import PlanError, load_plan
    plans = sorted((ROOT / "plans").glob("*.toml"))
    assert plans
    for plan in plans:
        try:
            load_plan(plan, runs_dir=tmp_path / "runs")
        except PlanError as e:
            faults.append(str(e))
    assert not faults, "\n".join(faults)


def test_an_unparsable_plan_is_reported_and_a_fragment_is_not(tmp_path):
    doc = """```toml
[train]
rank = 8
[[stage]]
name = "grid"
learning_rate = [1e-4]
```

```toml
# fragment: pasted into a plan after its grid
[[stage]]
name = "final"
from = "grid"
```
"""
    faults = unparsable_plans(doc, "made-up.md", tmp_path)
    assert len(faults) == 1 and "made-up.md:2" in faults[0] and "learning_rate" in faults[0]


def test_every_path_the_docs_name_exists(docs):
    faults = [f for path, text in docs.items() for f in missing_paths(text, path)]
    assert not faults, "\n".join(faults)


def test_a_missing_path_and_a_broken_anchor_are_reported(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "plan.py").write_text("")
    (tmp_path / "docs" / "other.md").write_text("# Other\n\n## The ledger\n")
    doc = tmp_path / "docs" / "page.md"
    text = ("The plan reader is `study/plan.py`, the report `study/report_findings.py` (moved), the CLI "
            "`flops_cli.py`; outputs such as `runs/demo/metrics.jsonl` and `<run>/adapter/` are not checked.\n"
            "See [the ledger](other.md#the-ledger), [the cap](other.md#the-cap) and [gone](missing.md).\n")
    doc.write_text(text)
    faults = missing_paths(text, doc, root=tmp_path)
    assert faults == ["page.md: link to other.md#the-cap: other.md has no heading #the-cap",
                      "page.md: link to missing.md: no such file",
                      "page.md: `study/report_findings.py`: no such path in the repository",
                      "page.md: `flops_cli.py`: no such path in the repository"]


def test_every_results_table_names_its_command_and_date(docs):
    faults = [f for path, text in docs.items() for f in unsourced_results(text, path.name)]
    assert not faults, "\n".join(faults)


def test_a_results_table_without_its_command_or_date_is_reported():
    doc = """## Measured

`python demo.py --data lotka_volterra_data.h5`, 2026-12-06:

| method | prey MSE | predator MSE |
|---|---:|---:|
| fine-tuned | 0.1367 | 0.02481 |

## Remembered

Someone ran the demo once:

| method | prey MSE | predator MSE |
|---|---:|---:|
| fine-tuned | 0.1367 | 0.02481 |

<!-- not a measurement: a worked example -->
| x | x squared |
|---|---:|
| 1.5 | 2.25 |
"""
    faults = unsourced_results(doc, "made-up.md")
    assert faults == ["made-up.md:13: a results table ('fine-tuned', ...) without a command and a date in the 15 "
                      "lines above it"]
