"""README.md's deletion workflow runs as written (issue 24, item 7): its shell lines through `unlearn-ext` (on
scikit-learn's digits and a small training run instead of the whole Fashion-MNIST, with the guard lifted: the
README's single-sample requests are inside the default guard only on a 60,000-image training set), and its
Python twin on a recording of the same small run."""
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message="unlearn_ext: compiled kernels not loaded")

from readme_snippets import workflow_lines, workflow_python  # noqa: E402
from unlearn_ext import cli, models  # noqa: E402
from unlearn_ext.deletion import guard  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["--train-size", "240", "--epochs", "1", "--batch-size", "16", "--no-progress"]


def _small(args):
    """The README's command on the small run: digits for Fashion-MNIST, the guard lifted for a request."""
    args = ["digits" if a == "fashion_mnist" else a for a in args]
    if args[0] == "train":
        return args + SMALL
    if args[0] == "forget":
        return args + ["--max-undone", "1"]
    return args


def _run_lines(lines):
    for words in lines:
        if words[0] == "printf":  # printf '12\n' > alice.txt
            assert words[2] == ">", words
            with open(words[3], "w") as f:
                f.write(words[1].replace("\\n", "\n"))
            continue
        assert words[0].endswith("unlearn-ext"), words
        assert cli.main(_small(words[1:])) == 0, words


def test_the_shell_workflow_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    lines = workflow_lines()
    assert [w[1] for w in lines if w[0].endswith("unlearn-ext")] == ["train", "forget", "forget", "requests"]
    _run_lines(lines)
    out = capsys.readouterr().out
    assert "| 1 | ids-" in out and "| 2 | ids-" in out and "served; undid" in out


def test_the_python_twin_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _run_lines([w for w in workflow_lines() if w[0] == "printf" or w[1] == "train"])
    monkeypatch.setitem(guard.REGIME_LIMITS, 0.1, 1.0)  # the small run: see the module docstring
    model = models.make_model("lenet", (1, 8, 8), 10)
    ns = {"model": model}
    exec(workflow_python(), ns)
    log = ns["log"]
    receipts = log.receipts()
    assert [r.request_id for r in receipts] == ["alice", "bob"]
    assert receipts[1].sha256_before == receipts[0].sha256_after
    assert receipts[1].sha256_after == __import__("unlearn_ext").deletion.state_digest(model.state_dict())
    assert torch.load("model-1.pt").keys() == model.state_dict().keys()


def test_the_exact_tier_lines_run_as_written(tmp_path, monkeypatch, capsys):
    """The exact tier's block: its dry run names the exact tier, and the output is bitwise the from-scratch
    model without the id (on digits: the README's id 59000 becomes sample 200 of the small run)."""
    from readme_snippets import exact_lines
    from unlearn_ext.deletion import state_digest

    monkeypatch.chdir(tmp_path)
    lines = [["printf", "200\\n", ">", w[3]] if w[0] == "printf" else w for w in exact_lines()]
    assert [w[1] for w in lines if w[0].endswith("unlearn-ext")] == ["train", "forget", "forget"]
    _run_lines(lines)
    out = capsys.readouterr().out
    dry = [line for line in out.splitlines() if line.startswith("tier: ")]
    assert len(dry) == 1 and "exact tier: t_min" in dry[0] and "% of Retrain" in dry[0]
    assert "exact: replayed" in out
    train = next(w for w in lines if w[0].endswith("unlearn-ext") and w[1] == "train")
    scratch = [a if a != "ft.ulx" else "scratch.ulx" for a in train[1:]]
    scratch = [a if a != "ft.pt" else "scratch.pt" for a in scratch]
    scratch = [a for a in scratch if a not in ("--checkpoint-every", "50")]
    with open("x.txt", "w") as f:
        f.write("200\n")
    assert cli.main(_small(scratch + ["--exclude-ids", "x.txt"])) == 0
    assert state_digest(torch.load("ft-1.pt")) == state_digest(torch.load("scratch.pt"))
