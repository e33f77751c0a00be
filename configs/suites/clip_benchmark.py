"""CLIP_benchmark's linear-probe datasets through CLIP's protocol (L-BFGS logistic regression, λ by CLIP's
coarse-to-fine search on validation, refit on train + validation), with kNN and few-shot alongside.

Prepare the TFDS datasets once (needs TensorFlow and network):

    for d in cifar10 cifar100 food101 sun397/tfds oxford_iiit_pet oxford_flowers102 cars196 dtd caltech101 \
             fgvc_aircraft eurosat/rgb resisc45 patch_camelyon stl10 gtsrb country211 kitti clevr; do
        tfds build "$d" --data_dir ~/tensorflow_datasets --file_format array_record
    done

(CLIP_benchmark reads many of these through torchvision or its own "wds/" webdataset mirrors; here TFDS names are
used so every split is a TFDS split. Datasets without a validation split get a seeded 10% of train.)

    python -m launch.suite --config configs/suites/clip_benchmark.py --workdir runs/suite_clip \
        --config.data_dir=~/tensorflow_datasets
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.backbones = ("openai/clip-vit-base-patch16", "google/siglip-base-patch16-224", "facebook/dinov2-base")
    config.datasets = tuple(
        f"tfds:{name}"
        for name in (
            "cifar10",
            "cifar100",
            "food101",
            "sun397/tfds",
            "oxford_iiit_pet",
            "oxford_flowers102",
            "cars196",
            "dtd",
            "caltech101",
            "fgvc_aircraft",
            "eurosat/rgb",
            "resisc45",
            "patch_camelyon",
            "stl10",
            "gtsrb",
            "country211",
        )
    )
    config.protocols = ("clip_linear_probe", "dinov2_knn", "bigvision_fewshot")
    config.overrides = ml_collections.ConfigDict()
    config.data_dir = "~/tensorflow_datasets"
    config.image_size = 224
    config.seed = 0
    return config
