"""mid_train end to end on CPU, and SFT picking up the mid checkpoint by default."""

import pytest

from engine import checkpoint as ckpt
from engine.tokenizer import Tokenizer
from tests.training.conftest import read_events
from tests.training.test_chat_sft import of_type, write_jsonl
from tests.training.test_finetune import make_source_checkpoint, varied_conversations
from training import chat_sft, mid_train
from training.tasks.registry import parse_mixture

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def home(tmp_path, monkeypatch, tiny_corpus):
    """A data home holding one tiny base model, d2."""
    monkeypatch.setenv("NANOCHAT_HOME", str(tmp_path / "home"))
    make_source_checkpoint(tmp_path / "home" / "base_checkpoints" / "d2", tiny_corpus[1])
    return tmp_path / "home"


def test_mid_run_on_the_builtin_mixture_trains_every_token_then_sft_starts_from_it(home):
    # Defaults everywhere: source = largest base model, output = mid_checkpoints/<its tag>,
    # mixture = the builtin offline tasks.
    run = home / "runs" / "mid"
    report = home / "report"
    assert mid_train.main(["--config", "tiny", "--run-dir", str(run),
                           "--report-dir", str(report)]) == 0  # fmt: skip
    events = read_events(run)
    types = [e["type"] for e in events]
    assert types[0] == "start" and types[-1] == "end" and events[-1]["status"] == "succeeded"
    assert events[0]["program"] == "mid_train" and events[0]["total_steps"] == 20
    assert events[0]["derived"]["val_conversations"] > 0
    metrics = of_type(events, "metrics")
    assert [e["step"] for e in metrics] == list(range(1, 21))
    # Dense packing: every one of the 4 x 64 positions of a step is a target.
    assert all(e["values"]["train/trained_tokens"] == 4 * 64 for e in metrics)
    assert [e["step"] for e in of_type(events, "eval")] == [0, 10, 20]
    assert "report" in types
    assert (report / "mid_train.md").read_text().startswith("## Midtraining")

    mid_dir = home / "mid_checkpoints" / "d2"
    model, meta = ckpt.load_model(mid_dir)
    assert meta["stage"] == "mid" and meta["step"] == 20
    assert meta["source"]["checkpoint_dir"] == str(home / "base_checkpoints" / "d2")
    assert ckpt.load_tokenizer_for(mid_dir).vocab_size == model.config.vocab_size

    # SFT without --source-dir prefers the mid checkpoint over the base one.
    sft_run = home / "runs" / "sft"
    assert chat_sft.main(["--config", "tiny", "--num-iterations", "3", "--eval-every", "-1",
                          "--run-dir", str(sft_run)]) == 0  # fmt: skip
    _, sft_meta = ckpt.load_model(home / "sft_checkpoints" / "d2")
    assert sft_meta["stage"] == "sft"
    assert sft_meta["source"] == {"checkpoint_dir": str(mid_dir), "step": 20, "stage": "mid",
                                  "model_tag": "d2"}  # fmt: skip


def test_mid_epochs_horizon_is_the_token_stream_cut_into_batches(home, tmp_path, tiny_corpus):
    conversations = varied_conversations(30)
    mixture = write_jsonl(tmp_path / "chats.jsonl", conversations)
    run = tmp_path / "run"
    args = ["--config", "tiny", "--mixture", mixture, "--num-iterations", "-1", "--num-epochs",
            "3", "--eval-every", "-1", "--run-dir", str(run), "--model-tag", "mine"]  # fmt: skip
    assert mid_train.main(args) == 0
    tokenizer = Tokenizer.load(tiny_corpus[1])
    tokens = sum(len(tokenizer.render_conversation(c)[0]) for c in parse_mixture(mixture, "train"))
    events = read_events(run)
    assert events[0]["total_steps"] == (3 * tokens - 1) // (4 * 64)
    assert events[0]["derived"]["epoch_tokens"] == tokens
    assert len(of_type(events, "metrics")) == events[0]["total_steps"]
    assert ckpt.list_steps(home / "mid_checkpoints" / "mine") == [events[0]["total_steps"]]


def test_mid_without_a_base_model_says_where_it_looked(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_HOME", str(tmp_path))
    assert mid_train.main(["--config", "tiny"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: source_dir: no model") and "base_checkpoints" in err
    assert "mid_checkpoints" not in err and len(err.splitlines()) == 1
