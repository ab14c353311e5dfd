import json

import torch

from sentio_lab.agents.checkpoint import load_checkpoint
from sentio_lab.experiment.cells import CELL_FILE, Cell, cell_done, parse_variant_args, train_cell

TINY = ("--total-timesteps", str(8 * 16 * 4), "--num-envs", "8", "--num-steps", "16", "--num-minibatches", "2",
        "--update-epochs", "1", "--window", "1", "--episode-length", "24")


def test_parse_variant_args_uses_the_variants_parser():
    args = parse_variant_args("ppo", ["--hidden-size", "16", "--fee-bps", "3"])
    assert args.ppo.hidden_size == 16 and args.env.fee_bps == 3.0


def test_cell_trains_once_and_records_itself(tmp_path, synthetic_market):
    cell = Cell(agent="tiny", variant="ppo", args=TINY, seed=2, fold=1)
    assert cell.cell_id == "tiny__seed2__fold001"
    folder = tmp_path / cell.cell_id
    assert cell_done(folder) is None
    record = train_cell(cell, synthetic_market, folder)
    assert cell_done(folder) == json.loads((folder / CELL_FILE).read_text())
    assert record["global_step"] == 8 * 16 * 4 and record["selected_iteration"] is None
    bundle = load_checkpoint(folder / "checkpoint.pt", variant="ppo")
    assert bundle["args"]["run"]["seed"] == 2 and bundle["iteration"] == 4


def test_selection_on_validation_keeps_the_best_chunk_and_matches_a_plain_run(tmp_path, synthetic_market):
    cell = Cell(agent="tiny", variant="ppo", args=TINY, seed=1, fold=0)
    plain = train_cell(cell, synthetic_market, tmp_path / "plain")
    chosen = train_cell(cell, synthetic_market, tmp_path / "chosen", select_every=2)
    history = chosen["selection_history"]
    assert [h["iteration"] for h in history] == [2, 4]
    best = max(history, key=lambda h: h["validation_sharpe"])
    assert chosen["selected_iteration"] == best["iteration"]
    assert chosen["validation_sharpe"] == best["validation_sharpe"]
    assert load_checkpoint(tmp_path / "chosen" / "best.pt")["iteration"] == best["iteration"]
    # training in resumed chunks is the same run as training in one go
    whole = load_checkpoint(tmp_path / "plain" / "checkpoint.pt")["agent"]
    chunked = load_checkpoint(tmp_path / "chosen" / "checkpoint.pt")["agent"]
    assert plain["global_step"] == chosen["global_step"]
    assert all(torch.equal(whole[k], chunked[k]) for k in whole)
