"""Bad input to every command: one line on stderr naming the problem and the fix, exit code 2, no traceback,
and every file that was there before is still there, byte for byte (and nothing new is left behind).

Most cases run in-process (`cli.main`, fast); those marked SUB run the real command in a fresh process, which
proves no traceback reaches the terminal. Disk-full cases cap the file size with RLIMIT_FSIZE in the child:
its writes past the cap fail with EFBIG, exactly as on a full disk, with no privileges needed.
"""

import hashlib
import json
import os
import pickle
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import sample

from gpt_tinystories import checkpoint
from gpt_tinystories.cli import main
from gpt_tinystories.config import TrainConfig
from gpt_tinystories.tokenizer import Tokenizer
from gpt_tinystories.trainer import train

FIXTURE = str(sample("fixture-5-stories.txt"))
VALIDATION = str(sample("validation-first1000.txt"))
TINY = ["--preset", "1M", "--d-model", "32", "--n-layer", "2", "--n-head", "4", "--context-length", "64",
        "--batch-size", "4", "--tokens-per-step", "256", "--max-steps", "2", "--eval-every", "2",
        "--eval-batches", "1", "--sample-tokens", "2", "--precision", "fp32", "--data", VALIDATION]  # fmt: skip
SUB, DISK_FULL = "subprocess", "disk full"


def train_args(*extra):
    return ["train", *TINY, "--tokenizer", "{root}/tok/tokenizer.json", "--out", "{root}/new-run", *extra]


CASES = [
    # prepare
    (["prepare", "--data", "{root}/empty.txt", "--out", "{root}/new"], "no stories found", None),
    (["prepare", "--data", "{root}/binary.txt", "--out", "{root}/new"], "looks binary", None),
    (["prepare", "--data", "{root}/cut-utf8.txt", "--out", "{root}/new"], "ends inside a character", None),
    (["prepare", "--data", "{root}/bad.jsonl", "--out", "{root}/new"], "has no string field", None),
    (["prepare", "--data", FIXTURE, "--tokenizer", "{root}/broken/tokenizer.json"], "cannot read tokenizer", None),
    (["prepare", "--data", FIXTURE, "--out", "{root}/a-file/new"], "a file stands where a folder is needed", None),
    (
        ["prepare", "--data", VALIDATION, "--tokenizer", "{root}/tok", "--out", "{root}/new"],
        "File too large",
        DISK_FULL,
    ),
    # tokenizer
    (["tokenizer", "train", "--data", "{root}/empty.txt", "--out", "{root}/t"], "no stories to train", None),
    (["tokenizer", "train", "--data", "{root}/binary.txt", "--out", "{root}/t"], "looks binary", None),
    (["tokenizer", "train", "--data", FIXTURE, "--vocab-size", "300", "--out", "{root}/a-file"], "a file stands", None),
    # train: config values and files
    (train_args("--config", "{root}/bad-syntax.toml"), "cannot parse config file", None),
    (train_args("--config", "{root}/list.json"), "must hold a table", None),
    (train_args("--config", "{root}/wrong-type.json"), "keep_last must be an integer, got 'two'", None),
    (train_args("--batch-size", "0"), "batch_size must be > 0", None),
    (train_args("--warmup-steps", "-1"), "warmup_steps must be >= 0", None),
    (train_args("--max-bad-steps", "0"), "max_bad_steps must be > 0", None),
    (train_args("--dropout", "1.5"), "dropout must be in [0, 1)", None),
    (train_args("--dropout", "sometimes"), "dropout must be a number in [0, 1) or auto, got 'sometimes'", None),
    (train_args("--narrow-d-model", "20"), "narrow_d_model=20 must keep heads of 8", None),
    (train_args("--data", "{root}/binary.txt"), "looks binary", None),
    (train_args("--data", "{root}/empty.txt"), "no stories found", SUB),
    # train: run dirs and checkpoints
    (train_args("--out", "{root}/newer-run"), "newer than this version reads", None),
    (train_args("--out", "{root}/damaged-run"), "is damaged", None),
    (train_args("--out", "{root}/wrong-tokenizer-run"), "is not the tokenizer of checkpoint", None),
    (train_args("--out", "{root}/escaping-metrics-run"), "outside the run dir", SUB),
    (train_args("--out", "{root}/escaping-checkpoints-run"), "outside the run dir", None),
    (train_args("--init-from", "{root}/corrupt-ckpt"), "is damaged", None),
    (train_args("--out", "{root}/a-file/run"), "a file stands where a folder is needed", None),
    # eval
    (["eval", "--checkpoint", "{root}/corrupt-ckpt", "--data", FIXTURE], "is damaged", None),
    (["eval", "--checkpoint", "{root}/newer-ckpt", "--data", FIXTURE], "upgrade gpt-tinystories", None),
    (["eval", "--checkpoint", "{root}/run", "--data", "{root}/prepared-other"], "prepare the data again", None),
    (["eval", "--checkpoint", "{root}/run", "--data", FIXTURE, "--device", "cuda"], "CUDA is not available", SUB),
    (["eval", "--checkpoint", "{root}/run", "--data", FIXTURE, "--context-length", "65"], "exceeds the model's", None),
    (
        ["eval", "--checkpoint", "{root}/run", "--data", FIXTURE, "--stride", "24"],
        "stride 24 must divide the context length 64 (e.g. 32)",
        None,
    ),  # fmt: skip
    (["eval", "--checkpoint", "{root}/run", "--data", "{root}/empty.txt"], "no stories found", None),
    # generate
    (["generate", "--checkpoint", "{root}/newer-ckpt"], "upgrade gpt-tinystories", SUB),
    (["generate", "--checkpoint", "{root}/run", "--device", "cuda"], "use --device cpu", None),
    (["generate", "--checkpoint", "{root}/run", "--device", "meta"], "unknown device 'meta'", None),
    (["generate", "--checkpoint", "{root}/other-tokenizer-ckpt"], "is not the tokenizer this checkpoint", None),
    (["generate", "--checkpoint", "{root}/damaged-run"], "every checkpoint in", None),
    (["generate", "--checkpoint", "{root}/truncated-meta-ckpt"], "metadata", None),
    (["generate", "--checkpoint", "{root}/run", "--prompt", "la " * 600], "--truncate-prompt to keep its last", None),
    # export
    (["export", "--checkpoint", "{root}/run", "--out", "{root}/run"], "exists and is not empty", None),
    (["export", "--checkpoint", "{root}/corrupt-ckpt", "--out", "{root}/hf"], "is damaged", None),
    (["export", "--checkpoint", "{root}/newer-ckpt", "--out", "{root}/hf"], "upgrade gpt-tinystories", None),
    (["export", "--checkpoint", "{root}/run", "--out", "{root}/linked-out"], "is a symlink", None),
    (["export", "--checkpoint", "{root}/run", "--out", "{root}/a-file/hf"], "a file stands", None),
    (["export", "--checkpoint", "{root}/run", "--out", "{root}/hf"], "free some disk space", DISK_FULL),
]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(root: Path) -> dict:
    """Every path under root (symlinks not followed) with its content hash."""
    found = {}
    for directory, names, files in os.walk(root):
        for name in names + files:
            path = Path(directory, name)
            found[path.relative_to(root)] = (
                f"-> {os.readlink(path)}" if path.is_symlink() else path.is_file() and digest(path)
            )
    return found


def copy_checkpoint(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def rewrite_meta(folder: Path, **changes) -> None:
    """Edit meta.json and re-checksum the files, as a deliberate (not accidental) change would."""
    meta = json.loads((folder / "meta.json").read_text())
    meta.update(changes, files={p.name: digest(p) for p in folder.iterdir() if p.name != "meta.json"})
    (folder / "meta.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def root(tmp_path_factory, bpe):
    root = tmp_path_factory.mktemp("bad-input")
    tok = bpe.save(root / "tok")
    config = TrainConfig(preset="1M", data=VALIDATION, tokenizer=str(tok), d_model=32, n_layer=2, n_head=4,
                         context_length=64, batch_size=4, tokens_per_step=256, max_steps=2, eval_every=2,
                         eval_batches=1, sample_tokens=2, precision="fp32")  # fmt: skip
    train(config, root / "run", progress=False)
    best = root / "run" / "checkpoints" / "best"
    step = root / "run" / "checkpoints" / "step-000002"
    other = Tokenizer.train([Path(FIXTURE).read_text()], 300)
    other.save(root / "other-tok")

    (root / "empty.txt").write_text("")
    (root / "binary.txt").write_bytes(b"Once upon a time\x00\x01\x02 there was a byte.")
    (root / "cut-utf8.txt").write_bytes("Once upon a time there was a café".encode()[:-1])
    (root / "bad.jsonl").write_text('{"text": "Once upon a time."}\n[1, 2, 3]\n')
    (root / "broken").mkdir()
    (root / "broken" / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    (root / "a-file").write_text("a file, not a folder")
    (root / "bad-syntax.toml").write_text("max_steps = = 3\n")
    (root / "list.json").write_text("[1, 2]")
    (root / "wrong-type.json").write_text('{"keep_last": "two"}')
    (root / "outside").mkdir()
    (root / "outside" / "metrics.jsonl").write_text("")

    corrupt = copy_checkpoint(best, root / "corrupt-ckpt")
    (corrupt / "model.safetensors").write_bytes((corrupt / "model.safetensors").read_bytes()[:-64])
    rewrite_meta(copy_checkpoint(best, root / "newer-ckpt"), format=checkpoint.FORMAT_VERSION + 1)
    other_tok = copy_checkpoint(best, root / "other-tokenizer-ckpt")
    other.save(other_tok)
    rewrite_meta(other_tok)
    truncated = copy_checkpoint(best, root / "truncated-meta-ckpt")
    (truncated / "meta.json").write_text((truncated / "meta.json").read_text()[:100])

    def run_copy(name: str) -> Path:
        target = root / name
        shutil.copytree(root / "run", target, ignore=shutil.ignore_patterns("best"))
        return target

    rewrite_meta(run_copy("newer-run") / "checkpoints" / "step-000002", format=checkpoint.FORMAT_VERSION + 1)
    damaged = run_copy("damaged-run") / "checkpoints" / "step-000002" / "trainer.pt"
    damaged.write_bytes(damaged.read_bytes()[:-10])
    other.save(run_copy("wrong-tokenizer-run"))
    metrics = run_copy("escaping-metrics-run") / "metrics.jsonl"
    metrics.unlink()
    metrics.symlink_to(root / "outside" / "metrics.jsonl")
    escaping = run_copy("escaping-checkpoints-run")
    shutil.move(escaping / "checkpoints", root / "outside" / "checkpoints")
    (escaping / "checkpoints").symlink_to(root / "outside" / "checkpoints")
    (root / "linked-out").symlink_to(root / "outside")
    (root / "empty-dir").mkdir()

    from gpt_tinystories.data import prepare

    prepare(FIXTURE, other, out=root / "prepared-other", progress=False)
    assert step.is_dir()
    return root


def run_in_process(args, capsys):
    try:
        code = main(args)
    except SystemExit as exit:  # argparse's errors
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def run_subprocess(args, file_size_limit=None):
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    result = subprocess.run([sys.executable, "-m", "gpt_tinystories", *args], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            preexec_fn=limit if file_size_limit else None)  # fmt: skip
    return result.returncode, result.stdout, result.stderr


@pytest.mark.parametrize("args, message, how", CASES, ids=[f"{i}-{c[0][0]}" for i, c in enumerate(CASES)])
def test_bad_input_gives_one_line_exit_2_and_changes_nothing(args, message, how, root, capsys):
    args = [a.format(root=root) for a in args]
    before = snapshot(root)
    if how is None:
        code, out, err = run_in_process(args, capsys)
    else:  # a disk that fills up after 64 KB
        code, out, err = run_subprocess(args, file_size_limit=64 << 10 if how == DISK_FULL else None)
    assert code == 2, (out, err)
    assert len(err.strip().splitlines()) == 1 and err.startswith("gpt-tinystories: error: "), err
    assert "Traceback" not in err and message in err and ".tmp-" not in err, err  # the path meant, not its temporary
    assert snapshot(root) == before


def test_the_table_covers_every_command():
    assert len(CASES) >= 25
    assert {c[0][0] for c in CASES} == {"prepare", "tokenizer", "train", "eval", "generate", "export"}
    assert {c[2] for c in CASES} == {None, SUB, DISK_FULL}


class Payload:
    """A pickle that runs a command when unpickled: what a malicious checkpoint would hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickled_payload_in_trainer_state_is_refused_not_run(root, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    folder = run / "checkpoints" / "step-000002"
    marker = tmp_path / "pwned"
    (folder / "trainer.pt").write_bytes(pickle.dumps(Payload(marker)))
    rewrite_meta(folder)  # a matching checksum: the attacker wrote meta.json too
    args = [a.format(root=root) for a in train_args("--out", str(run), "--max-steps", "3")]
    code, out, err = run_in_process(args, capsys)
    assert code == 2 and "refusing to unpickle" in err, err
    assert not marker.exists()


def test_a_pickled_transformers_model_is_refused_not_run(root, tmp_path):
    folder = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(root / "run"), "--out", str(folder)]) == 0
    marker = tmp_path / "pwned"
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    code, out, err = run_subprocess(["generate", "--checkpoint", folder, "--max-new-tokens", "3"])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "refusing to unpickle" in err and not marker.exists()
