"""PedCLIP: vision-language model for pediatric X-rays with a Mixture of Body-part Experts."""

from pathlib import Path

from setuptools import find_packages, setup

EXTRAS = {
    "train": ["accelerate>=1.0", "datasets>=3.0", "scikit-learn>=1.3", "tensorboard"],
    "eval": ["datasets>=3.0", "scikit-learn>=1.3", "matplotlib>=3.7", "evaluate>=0.4"],
    # pylibjpeg-libjpeg (GPL-3.0) decodes JPEG Lossless and JPEG-LS, common in CR/DX archives; Pillow does JPEG 2000
    "dicom": ["pydicom>=3.0", "pylibjpeg>=2.0", "pylibjpeg-libjpeg>=2.1"],
    "curate": ["pydicom>=3.0", "pylibjpeg>=2.0", "pylibjpeg-libjpeg>=2.1", "datasets>=3.0", "matplotlib>=3.7"],
    "lora": ["peft>=0.17"],  # LoRA on the stacked MoBE experts needs target_parameters
    "cli": ["pyarrow>=14", "pyyaml", "pydicom>=3.0", "pylibjpeg>=2.0", "pylibjpeg-libjpeg>=2.1"],
    "test": ["pytest>=8", "pydicom>=3.0", "pydicom-data", "accelerate>=1.0", "datasets>=3.0", "matplotlib>=3.7"],
}
EXTRAS["all"] = sorted({req for reqs in EXTRAS.values() for req in reqs})

setup(
    name="pedclip",
    version="0.1.0",
    description=__doc__,
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    py_modules=["configuration_pedclip", "modeling_pedclip", "processing_pedclip"],
    packages=find_packages(include=["pedclip", "pedclip.*", "pexr", "pexr.*", "eval", "eval.*"]),
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0,<6",
        "huggingface_hub>=1.0",
        "safetensors>=0.4",
        "numpy>=1.24",
        "pillow>=10",
    ],
    data_files=[("share/pedclip", ["model_card.md"])],  # the card template pedclip.model_card renders
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["pexr = pexr.cli:main", "pedclip = pedclip.cli:main"]},
)
