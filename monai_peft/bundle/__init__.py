"""monai_peft.bundle: the support layer of the MONAI bundles under ``bundles/``.

* :func:`datalist_from_dir`: ``--dataset_dir`` (files, per-case modality folders, DICOM series) -> datalist;
* :class:`AdapterCheckpointSaver` / :class:`AdapterCheckpointLoader` / :func:`resume_from_checkpoint`: best and
  last adapter checkpoints written atomically under a run folder, resume of a killed run;
* :func:`export_merged_model`: merged ``models/model.pt`` / ``model.ts`` on demand
  (``python -m monai_peft.bundle export --bundle_root <bundle>``);
* DDP helpers for ``multi_gpu_train.json``: :func:`init_distributed`, :func:`ddp_wrap`,
  :func:`distributed_sampler`, :func:`main_process_handlers`;
* handlers: :class:`ProgressBarHandler`, :class:`PredictionCSVWriter` (atomic per-case CSV).

In a bundle config: ``"imports": ["$import monai_peft.bundle"]`` then ``"_target_": "AdapterCheckpointSaver"``. See
``docs/bundles.md``.
"""

from monai_peft.bundle.base_weights import read_base_weights, save_base_weights
from monai_peft.bundle.checkpoint import (
    CHECKPOINT_INFO,
    TRAINER_STATE,
    AdapterCheckpointLoader,
    AdapterCheckpointSaver,
    install_adapter,
    load_training_checkpoint,
    resume_from_checkpoint,
    save_training_checkpoint,
)
from monai_peft.bundle.datalist import DEFAULT_EXTENSIONS, datalist_from_dir
from monai_peft.bundle.distributed import (
    WRITING_HANDLERS,
    ddp_wrap,
    destroy_distributed,
    distributed_device,
    distributed_sampler,
    get_rank,
    init_distributed,
    is_main_process,
    main_process_handlers,
    summary_writer,
    unwrap_ddp,
)
from monai_peft.bundle.export import bundle_parser, export_merged_model, merged_network, network_input_shape
from monai_peft.bundle.flags import flag
from monai_peft.bundle.handlers import PredictionCSVWriter, ProgressBarHandler
from monai_peft.bundle.samples import export_medmnist_images

__all__ = [
    "read_base_weights",
    "save_base_weights",
    "flag",
    "CHECKPOINT_INFO",
    "DEFAULT_EXTENSIONS",
    "TRAINER_STATE",
    "WRITING_HANDLERS",
    "AdapterCheckpointLoader",
    "AdapterCheckpointSaver",
    "PredictionCSVWriter",
    "ProgressBarHandler",
    "bundle_parser",
    "datalist_from_dir",
    "ddp_wrap",
    "destroy_distributed",
    "distributed_device",
    "distributed_sampler",
    "export_medmnist_images",
    "export_merged_model",
    "get_rank",
    "init_distributed",
    "install_adapter",
    "is_main_process",
    "load_training_checkpoint",
    "main_process_handlers",
    "merged_network",
    "network_input_shape",
    "resume_from_checkpoint",
    "save_training_checkpoint",
    "summary_writer",
    "unwrap_ddp",
]
