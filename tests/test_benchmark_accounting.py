"""benchmarks/decode.py's accounting, which its tables rest on: the KV bytes each method must
read and the kernel categories of a profile (CPU; the timing itself needs a GPU)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import decode  # noqa: E402
import decode_table  # noqa: E402

LLAMA3 = decode.SHAPES["llama3-8b"]
LAYER_BYTES_128K = 2 * 8 * 131072 * 128 * 2  # K and V of one layer, batch 1, bf16


def test_dense_methods_read_every_layer_and_tidal_its_full_layers_plus_the_chosen_rows():
    assert decode.Method("full").attention_bytes(LLAMA3, 1, 131072) == 32 * LAYER_BYTES_128K
    assert decode.Method("topk_oracle:256").attention_bytes(LLAMA3, 1, 131072) == 32 * LAYER_BYTES_128K
    # 2 dense + 2 selection layers read everything; 28 sparse layers 256 rows per query head.
    sparse = 28 * 2 * 32 * 256 * 128 * 2
    assert decode.Method("tidal:256").attention_bytes(LLAMA3, 1, 131072) == 4 * LAYER_BYTES_128K + sparse
    # Quest: 2 dense layers, then per layer its pages' min / max and the chosen pages' rows.
    pages = 2 * 30 * 8 * (131072 // 16) * 128 * 2
    assert decode.Method("quest:256").attention_bytes(LLAMA3, 1, 131072) == (
        2 * LAYER_BYTES_128K + 30 * 2 * 32 * 256 * 128 * 2 + pages)
    # A context shorter than the budget: a sparse layer reads the context, not the budget.
    assert decode.Method("tidal:2048").attention_bytes(LLAMA3, 1, 1024) == decode.Method("full").attention_bytes(
        LLAMA3, 1, 1024) - 28 * 2 * 8 * 1024 * 128 * 2 + 28 * 2 * 32 * 1024 * 128 * 2


@pytest.mark.parametrize("name, category", [
    ("nvjet_sm90_tst_64x8_64x16_2x1_v_bz_TNT", "weights"),
    ("void cublasLt::splitKreduce_kernel<32, 16, int, float>", "weights"),
    ("triton_tem_fused_mm_0", "weights"),
    ("flash_decode_split", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm80_flash_fprop_wmma_f16", "attention"),
    ("radix_histogram", "selection"),
    ("quest_scores", "selection"),
    ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL", "communication"),
    ("triton_poi_fused_add_mul_rsqrt_0", "other"),
])
def test_kernel_categories(name, category):
    assert decode.kernel_category(name) == category


def test_methods_parse_their_budget_and_options():
    assert decode.Method("inductor").options() is None
    tidal = decode.Method("tidal:2048")
    assert (tidal.mode, tidal.budget) == ("tidal", 2048)
    assert tidal.options()["config"].budget == 2048 and tidal.options()["cudagraphs"] is True
    assert tidal.options(cudagraphs=False)["cudagraphs"] is False  # --step-graph captures the step itself
    assert tidal.options()["merge_projections"] is True and tidal.options(merge=False)["merge_projections"] is False
    assert decode.Method("quest:256").page_size() == 16 and tidal.page_size() is None


def test_baselines_compile_plain_inductor_and_read_every_layer():
    for name in ("inductor", "inductor+where"):
        method = decode.Method(name)
        assert method.is_baseline and method.options() is None
        assert method.attention_bytes(LLAMA3, 1, 131072) == 32 * LAYER_BYTES_128K
    with decode.Method("inductor+where").compiling():
        pre_pass = torch._inductor.config.post_grad_custom_pre_pass
        assert type(pre_pass).__name__ == "MaskedFillAsWhere"
    assert torch._inductor.config.post_grad_custom_pre_pass is None
    assert decode.Method("tidal:256").file_name == "tidal_256"
    assert decode.Method("inductor+where").file_name == "inductor_where"


def test_trace_files_go_into_the_asked_folder(tmp_path):
    assert decode.trace_file(None, "tidal_256") is None
    path = decode.trace_file(str(tmp_path / "traces"), "tidal_256-rank0")
    assert path == str(tmp_path / "traces" / "tidal_256-rank0.json.gz") and (tmp_path / "traces").is_dir()


def test_idle_gaps_split_kernel_to_kernel_gaps_from_waits_for_the_host():
    # Two steps of three kernels (us); the second kernel overlaps the first; 100 us between steps.
    step = [(0.0, 10.0), (5.0, 12.0), (15.0, 20.0)]
    later = [(start + 120.0, end + 120.0) for start, end in step]
    gaps = decode.idle_gaps(later + step, steps=2)
    assert gaps == pytest.approx(dict(short_ms=2 * 3.0 / 1e3 / 2, long_ms=100.0 / 1e3 / 2, longest_ms=0.1))
    assert decode.idle_gaps([], steps=1) == dict(short_ms=0.0, long_ms=0.0, longest_ms=0.0)


def test_inductor_config_flag_parses_literals_and_rejects_bare_keys():
    parser = argparse.ArgumentParser()
    decode.add_measure_arguments(parser)
    args = parser.parse_args(["--inductor-config", "max_autotune=True", "coordinate_descent_tuning=1"])
    assert dict(args.inductor_config) == {"max_autotune": True, "coordinate_descent_tuning": 1}
    assert dict(parser.parse_args([]).inductor_config) == {}
    with pytest.raises(SystemExit):
        parser.parse_args(["--inductor-config", "max_autotune"])


def test_beside_plain_runs_each_row_without_then_with_the_patches_and_rates_the_patches():
    args = argparse.Namespace(inductor_config=[("max_autotune_gemm", True)], beside_plain=True)
    assert decode.patch_sets(args) == [{}, {"max_autotune_gemm": True}]
    assert decode.patch_sets(argparse.Namespace(**{**vars(args), "beside_plain": False})) == [{"max_autotune_gemm": True}]
    assert decode.patch_sets(argparse.Namespace(inductor_config=[], beside_plain=True)) == [{}]
    plain, patched = (decode.Row("llama3-8b", 1, 1024, name, ms, 1.0, 0, ms - 1, {}, [], floor=True)
                      for name, ms in (("full", 6.0), ("full+config", 5.0)))
    decode.derive([plain, patched], bandwidth=1e12)
    assert patched.speedup_vs_full == 6.0 / 5.0 and patched.kernel_speedup_vs_full == 5.0 / 4.0


def test_step_graph_rows_run_after_or_instead_of_plain_ones_and_are_rated_against_captured_rows():
    assert [decode.step_graphs(argparse.Namespace(step_graph=choice)) for choice in (None, "also", "only")] == [
        [False], [False, True], [True]]

    def row(method, context, ms):
        return decode.Row("llama3-8b", 1, context, method, ms, 1.0, 4e9, ms - 1, {}, [],
                          floor=context == decode.FLOOR_CONTEXT)

    floor, full, tidal = row("full", 1024, 6.0), row("full", 131072, 11.0), row("tidal:256", 131072, 7.0)
    graph_floor, graph_full = row("full+graph", 1024, 5.0), row("full+graph", 131072, 10.0)
    graph_tidal = row("tidal:256+graph", 131072, 5.5)
    decode.derive([floor, full, tidal, graph_floor, graph_full, graph_tidal], bandwidth=2e12)
    assert tidal.speedup_vs_full == 11.0 / 7.0 and tidal.attention_ms == 1.0
    assert graph_tidal.speedup_vs_full == 10.0 / 5.5 and graph_tidal.attention_ms == 0.5
    assert graph_full.speedup_vs_full == 1.0


def test_separate_projection_rows_run_for_the_backend_only_and_are_rated_against_separate_rows():
    def variants(choice, method):
        return decode.merge_variants(argparse.Namespace(separate_projections=choice), decode.Method(method))

    assert [variants(choice, "tidal:256") for choice in (None, "also", "only")] == [[True], [True, False], [False]]
    assert variants("also", "inductor") == [True]  # plain Inductor has no merge to switch off

    def row(method, context, ms):
        return decode.Row("llama3-8b", 1, context, method, ms, 1.0, 4e9, ms - 1, {}, [],
                          floor=context == decode.FLOOR_CONTEXT)

    floor, full, tidal = row("full", 1024, 5.0), row("full", 131072, 10.0), row("tidal:256", 131072, 6.0)
    separate = [row("full+separate", 1024, 5.5), row("full+separate", 131072, 10.5),
                row("tidal:256+separate", 131072, 7.0), row("tidal:256+separate+graph", 131072, 6.5)]
    graph_full = row("full+separate+graph", 131072, 9.0)
    decode.derive([floor, full, tidal, *separate, graph_full], bandwidth=2e12)
    assert tidal.speedup_vs_full == 10.0 / 6.0 and tidal.attention_ms == 1.0
    assert separate[2].speedup_vs_full == 10.5 / 7.0 and separate[2].attention_ms == 1.5
    assert separate[3].speedup_vs_full == 9.0 / 6.5


def test_tune_quest_counts_the_page_metadata_quest_scores_reads():
    import tune_quest

    assert tune_quest.metadata_bytes(1, 8, 131072) == 2 * 8 * 8192 * 128 * 2  # 33.5 MB: Llama-3-8B batch 1 128K
    assert tune_quest.metadata_bytes(1, 8, 131072 + 1) == 2 * 8 * 8193 * 128 * 2  # a partial page counts whole
    assert tune_quest.kernels.QUEST_BLOCK_P in tune_quest.BLOCKS and tune_quest.kernels.QUEST_WARPS in tune_quest.WARPS


def test_host_gaps_attribute_the_hosts_events_to_the_gpus_long_waits():
    """A synthetic trace: two kernels 100 us apart (a long gap) and 5 us apart (a short one);
    host events count by their time inside the long gap only."""
    import host_gaps

    events = [dict(ph="X", cat="kernel", name="k", ts=0, dur=10), dict(ph="X", cat="kernel", name="k", ts=110, dur=10),
              dict(ph="X", cat="kernel", name="k", ts=125, dur=10),
              dict(ph="X", cat="cuda_runtime", name="cudaGraphLaunch", ts=50, dur=100),  # 60 us inside the gap
              dict(ph="X", cat="cpu_op", name="TorchDynamo Cache Lookup", ts=12, dur=20),
              dict(ph="X", cat="cpu_op", name="late", ts=200, dur=50)]
    gaps = host_gaps.long_gaps(events)
    assert gaps == [(10, 110)]
    inside = host_gaps.host_time_in_gaps(events, gaps)
    assert inside == {("cuda_runtime", "cudaGraphLaunch"): 60, ("cpu_op", "TorchDynamo Cache Lookup"): 20}


def test_tune_topk_times_each_gather_split_and_split_plan_it_names_and_each_is_exact(monkeypatch):
    """benchmarks/tune_topk.py's --gather-programs, --split-sweep, --digit-bits, --group-tail,
    --hold-tail, --select-block and --early-exit lines: a cell per plan, labelled as it was built, none marked
    "!" (indices other than the default plan's); interpreted kernels, the timing replaced (it
    needs a GPU)."""
    import tune_topk
    from tidal_compile.ops import kernels

    monkeypatch.setattr(tune_topk, "us", lambda fn: fn() is not None and 1.0)
    monkeypatch.setattr(tune_topk, "GROUPS", (4, 8))
    monkeypatch.setattr(tune_topk, "SPLIT_STEPS", ((16, 16, 8), (32, 64, 16)))
    logits = torch.randn(1, 4, 300, generator=torch.Generator().manual_seed(0))
    lse = torch.logsumexp(logits, -1)
    summary = kernels.summarize_mask(None, 1, 300, logits.device)
    selection = (logits, lse, summary, 20, 4, False, kernels.select_topk(logits, lse, summary, 20, 4, False))
    picked = kernels.plan_topk(4, 300, 20, logits.device, grouped=True, gather_programs=2)
    programs = tune_topk.gather_programs_line(picked, *selection, [1, 2])
    split = tune_topk.split_sweep_line(picked, *selection)
    variants = [tune_topk.plans_line(title, plans, *selection)
                for title, plans in tune_topk.plan_variants(
                    picked, {"digit_bits": [4, 8], "group_tail_min": [4, 16], "group_block": [32],
                             "select_block": [16, 64], "early_exit": [0, 8]}, True)]
    assert programs.split(": ", 1)[1] == "1/8w:1.0 1/16w:1.0 2/8w:1.0 2/16w:1.0"
    assert variants == ["  digit widths (picked 8-bit): 4-bit:1.0 8-bit:1.0",
                        "  group tails (picked tail 256): tail 4:1.0 tail 16:1.0",
                        f"  group-key steps (picked step {picked.group_block}): step 32:1.0",
                        f"  candidate steps (picked step {picked.select_block}): step 16:1.0 step 64:1.0",
                        "  longer rows (picked streamed): streamed:1.0 held:1.0",
                        "  selections (picked exit slack 0): every digit:1.0 exit slack 0:1.0 exit slack 8:1.0"]
    assert split.split("): ", 1)[1] == "4/16/16/8w:1.0 4/32/64/16w:1.0 8/16/16/8w:1.0 8/32/64/16w:1.0; best 4/16/16/8w:1.0"


def test_topk_phases_marks_every_phase_of_the_shipped_radix_select():
    """benchmarks/topk_phases.py's timed copy of the top-k template finds each phase's statement
    in the current radix_select (it asserts so) and still renders to valid Python."""
    import ast

    import jinja2
    import topk_phases

    source = jinja2.Environment(loader=jinja2.FileSystemLoader(str(topk_phases.timed_templates()))).get_template(
        "radix_topk.py.jinja").render()
    ast.parse(source)
    select = source[source.index("def radix_select("):]
    assert select.count("_clock()") == len(topk_phases.PHASES) + 1


def test_the_ceiling_is_the_speed_up_of_a_step_at_the_floor_less_its_reads_plus_the_methods_reads():
    def row(method, context, ms, attention_bytes):
        return decode.Row("llama3-8b", 1, context, method, ms, 1.0, attention_bytes, ms - 1, {}, [],
                          floor=context == decode.FLOOR_CONTEXT)

    floor, full = row("full", 1024, 6.0, 2e8), row("full", 131072, 11.0, 4e9)
    inductor, tidal = row("inductor", 131072, 50.0, 4e9), row("tidal:256", 131072, 7.0, 1e9)
    decode.derive([floor, full, tidal, inductor], bandwidth=2e12)  # 1 GB: 0.5 ms; the floor's 0.1 ms
    assert tidal.read_ms == 0.5 and tidal.attention_ms == 1.0
    assert tidal.ceiling_vs_full == 11.0 / 6.4 and tidal.ceiling_vs_inductor == 50.0 / 6.4
    assert full.ceiling_vs_full == 11.0 / 7.9 and floor.ceiling_vs_full is None


def test_kernel_summary_counts_each_kernels_time_and_launches_per_step():
    # two steps: a matrix product and two top-k launches each; times in us
    kernels = [("nvjet_sm90_tst", 0, 1000), ("radix_select", 1000, 1040), ("radix_select", 1050, 1090),
               ("nvjet_sm90_tst", 2000, 3000), ("radix_select", 3000, 3040), ("radix_select", 3050, 3090)]
    summary = decode.kernel_summary(kernels, steps=2)
    assert summary["launches"] == 3
    assert summary["kernels"] == [dict(name="nvjet_sm90_tst", ms=1.0, launches=1.0),
                                  dict(name="radix_select", ms=pytest.approx(0.08), launches=2.0)]
    assert summary["categories"]["weights"] == 1.0 and summary["categories"]["selection"] == pytest.approx(0.08)
    assert summary["kernel_ms"] == pytest.approx(1.08)



def test_decode_table_shows_each_rows_latest_figure_with_its_own_runs_floor_and_ratios(tmp_path):
    def run(name, *rows):  # one decode.py run: its rows derived together, written as decode.py writes them
        decode.derive(list(rows), bandwidth=2e12)
        with open(tmp_path / name, "w") as f:
            json.dump({"rows": [dict(dataclasses.asdict(r), outside_ms=r.outside_ms) for r in rows]}, f)
        return str(tmp_path / name)

    def row(method, context, ms, pipelined=None):
        return decode.Row("llama3-8b", 1, context, method, ms, 1.0, int(1e9), ms - 1, {}, [],
                          floor=context == decode.FLOOR_CONTEXT, pipelined_ms=pipelined)

    paths = [run("decode-c.json", row("inductor", 131072, 50.0)),
             run("decode-a.json", row("full", 1024, 6.0), row("full", 131072, 11.0), row("tidal:256", 131072, 8.0)),
             run("decode-b.json", row("full", 1024, 5.0), row("tidal:256", 131072, 7.0, pipelined=5.0),
                 row("full", 131072, 10.5, pipelined=9.0))]
    lines = decode_table.table(decode_table.load_rows(paths)).splitlines()
    assert len(lines) == 3  # header, rule, one line: the floors are a column
    header, cells = ([c.strip() for c in line.strip("|").split("|")] for line in (lines[0], lines[2]))
    line = dict(zip(header, cells))
    assert (line["inductor"], line["full"], line["tidal:256"], line["quest:256"]) == ("50.00", "10.50", "7.00", "-")
    assert line["floor (1K, same run)"] == "5.00"
    # run b: 10.5 / 7.0, 9.5 / 6.0 by kernels and 9.0 / 5.0 pipelined (a run without pipelined steps: "-")
    assert line["tidal:256 / full (by kernels; pipelined)"] == "1.50x (1.58x; 1.80x)"
    assert line["tidal:256 / inductor"] == "-"  # no Inductor in tidal's run
    assert line["from"] == "`b`, `c`"
    commands = decode_table.missing(decode_table.load_rows(paths))
    assert commands == ["python benchmarks/decode.py --shapes llama3-8b --batches 1 --contexts 131072 --methods full "
                        "tidal:256 tidal:2048 quest:256 topk_oracle:256 --floor-methods full  # missing: tidal:2048 "
                        "quest:256 topk_oracle:256"]
    # the empty cells alone: this line has its floor and tidal's run, so neither runs again; lines
    # without tidal k=256 (nor a floor) run it beside full (again: its ratios), with a floor, those
    # that need the same methods in one command
    assert decode_table.missing(decode_table.load_rows(paths), cells_only=True) == [
        "python benchmarks/decode.py --shapes llama3-8b --batches 1 --contexts 131072 --methods tidal:2048 quest:256 "
        "topk_oracle:256 --floor-methods"]
    paths.append(run("decode-d.json", row("full", 32768, 8.0), row("full", 65536, 9.0), row("quest:256", 8192, 7.0)))
    assert decode_table.missing(decode_table.load_rows(paths), cells_only=True) == [
        "python benchmarks/decode.py --shapes llama3-8b --batches 1 --contexts 8192 --methods inductor full tidal:256 "
        "tidal:2048 topk_oracle:256 --floor-methods full",
        "python benchmarks/decode.py --shapes llama3-8b --batches 1 --contexts 32768 65536 --methods inductor full "
        "tidal:256 tidal:2048 quest:256 topk_oracle:256 --floor-methods full",
        "python benchmarks/decode.py --shapes llama3-8b --batches 1 --contexts 131072 --methods tidal:2048 quest:256 "
        "topk_oracle:256 --floor-methods"]


def test_decode_table_puts_captured_rows_in_a_table_of_their_own(tmp_path):
    def row(method, context, ms):
        return decode.Row("llama2-7b", 1, context, method, ms, 1.0, int(1e9), ms - 1, {}, [],
                          floor=context == decode.FLOOR_CONTEXT)

    rows = [row("full", 1024, 5.0), row("inductor", 102400, 18.0), row("tidal:256", 102400, 6.0),
            row("full+graph", 1024, 4.5), row("inductor+graph", 102400, 17.0), row("tidal:256+graph", 102400, 5.0),
            row("tidal:256+graph", 65536, 4.0)]  # a line run captured only
    decode.derive(rows, bandwidth=2e12)
    with open(tmp_path / "decode-a.json", "w") as f:
        json.dump({"rows": [dict(dataclasses.asdict(r), outside_ms=r.outside_ms) for r in rows]}, f)
    loaded = decode_table.load_rows([str(tmp_path / "decode-a.json")])

    def by_context(text):
        header, _, *lines = ([c.strip() for c in line.strip("|").split("|")] for line in text.splitlines())
        return {line[2]: dict(zip(header, line)) for line in lines}

    plain, captured = by_context(decode_table.table(loaded)), by_context(decode_table.table(loaded, "+graph"))
    assert list(plain) == ["100K"] and list(captured) == ["64K", "100K"]
    assert (plain["100K"]["inductor"], plain["100K"]["tidal:256"], plain["100K"]["tidal:256 / inductor"]) == (
        "18.00", "6.00", "3.00x")
    assert (captured["100K"]["inductor+graph"], captured["100K"]["tidal:256+graph"]) == ("17.00", "5.00")
    assert captured["100K"]["tidal:256+graph / inductor"] == "3.40x"  # against its run's captured Inductor row
    assert [command.split("--contexts ")[1].split()[0] for command in decode_table.missing(loaded)] == ["102400"]


def test_generate_steps_clocks_every_token_of_a_compiled_generate_and_times_the_steps_after_the_first():
    """benchmarks/generate_steps.py's clock rides along compile_for_generation's generate as a
    stopping criterion (so generate passes a caller's criteria through), sees every new token, and
    times the decode steps from the second on."""
    import generate_steps
    from models import prompts, tiny_model
    from tidal_compile.hf import compile_for_generation

    torch._dynamo.reset()
    model = compile_for_generation(tiny_model("llama", layers=3), budget=4, inner_backend="eager")
    prompt, _ = prompts(1, 9, False)
    steps = generate_steps.generate_steps(model, prompt, tokens=6, cache_len=20)
    assert len(steps) == 4 and all(ms > 0 for ms in steps)
    assert generate_steps.decode_step_ms([0.0, 1.0, 1.5, 2.25]) == [500.0, 750.0]


def test_projections_merged_and_separate_read_the_same_weights_and_compute_the_same_products():
    """benchmarks/projections.py: the merged form (q|k|v, gate|up: four products a layer) reads the
    same weight rows as the model's seven and its outputs, split, equal theirs (CPU, a small shape
    with grouped KV heads)."""
    import projections

    shape = dataclasses.replace(LLAMA3, hidden=64, intermediate=96, heads=4, kv_heads=2)
    separate, merged = projections.projections(shape, False), projections.projections(shape, True)
    assert [name for name, _, _ in separate] == ["q", "k", "v", "o", "gate", "up", "down"]
    assert [name for name, _, _ in merged] == ["qkv", "o", "gate_up", "down"]
    for source in ("hidden", "attention", "intermediate"):
        assert (sum(sum(outs) for _, s, outs in separate if s == source)
                == sum(sum(outs) for _, s, outs in merged if s == source))
    torch.manual_seed(0)
    weights = projections.layer_weights(shape, torch.device("cpu"), torch.float32)
    activations = {"hidden": torch.randn(3, 64), "attention": torch.randn(3, 4 * decode.HEAD_DIM),
                   "intermediate": torch.randn(3, 96)}
    outs = [projections.layer_products(weights, activations, shape, merged) for merged in (False, True)]
    assert [out.shape for out in outs[0]] == [out.shape for out in outs[1]]
    assert len(outs[0]) == 7 and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*outs))
    q_rows = 4 * decode.HEAD_DIM
    k_expected = activations["hidden"] @ weights["qkv"][q_rows:q_rows + 2 * decode.HEAD_DIM].T
    assert torch.allclose(outs[0][1], k_expected, atol=1e-5)


def test_tune_sparse_decode_runs_each_plan_it_builds_and_restores_the_default(monkeypatch):
    """benchmarks/tune_sparse_decode.py: a swept plan keeps the default's programs and switches,
    splits the budget into whole tiles or is skipped, and runs as built (interpreted kernels, its
    output the default's), the default planner not consulted."""
    import tune_sparse_decode
    from tidal_compile.ops import kernels

    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 1, 128, generator=gen), torch.randn(1, 2, 300, 128, generator=gen)
    idx = torch.rand(1, 4, 300, generator=gen).topk(96, dim=-1).indices.sort(dim=-1).values.to(torch.int32)
    layers = [(q, k, k, idx)]
    default = kernels.plan_sparse_decode(1, 4, 2, 4, 96, 128, q.device, False, "none")
    expected = tune_sparse_decode.run_layers(layers, None)[0]
    splits = []
    partials = kernels._partials
    monkeypatch.setattr(kernels, "_partials", lambda *args: splits.append(args[2]) or partials(*args))
    assert tune_sparse_decode.plan_of(default, 96, 32, 4, 2, 8) is None  # 8 splits of 32 exceed 96 slots
    plan = tune_sparse_decode.plan_of(default, 96, 32, 4, 2, 3)
    assert (plan.splits, plan.split_len, plan.programs, plan.shared) == (3, 32, default.programs, default.shared)
    monkeypatch.setattr(kernels, "plan_sparse_decode", lambda *args: pytest.fail("a built plan is planned again"))
    out = tune_sparse_decode.run_layers(layers, plan)[0]
    assert splits == [3] and torch.allclose(out, expected, atol=1e-5)
