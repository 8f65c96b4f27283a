"""`pi-peft push ADAPTER REPO_ID`: see `pi_peft.sharing.hub`."""

from __future__ import annotations

import argparse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pi-peft push",
        description="Upload a PI adapter folder with a generated model card to the Hugging Face Hub. The token comes "
        "from HF_TOKEN or `hf auth login`.",
    )
    p.add_argument("adapter", help="adapter folder (written by `model.save_pretrained`)")
    p.add_argument("repo_id", help="target repo, e.g. you/llama2-16k-pi (created if missing)")
    p.add_argument("--eval-dir", help="output folder of `pi-peft eval`: tables and plots go into the card")
    p.add_argument("--private", action="store_true", default=None, help="create the repo as private")
    p.add_argument("--revision", help="branch to push to (created if missing)")
    p.add_argument("--commit-message", help="commit message")
    p.add_argument("--commit-description", help="commit description")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.add_argument("--license", help="license for the card (default: the base model's, when known)")
    p.add_argument("--base-model", help="base model id for the card (default: from adapter_config.json)")
    p.add_argument("--qlora", action="store_true", default=None, help="the adapter was trained on a 4-bit base")
    return p


def cli_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from ..sharing.hub import push_adapter

    info = push_adapter(
        args.adapter,
        args.repo_id,
        eval_dir=args.eval_dir,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message,
        commit_description=args.commit_description,
        create_pr=args.create_pr,
        license=args.license,
        quantized=args.qlora,
        base_model=args.base_model,
    )
    print(f"Pushed to {getattr(info, 'commit_url', None) or args.repo_id}")
    return 0
