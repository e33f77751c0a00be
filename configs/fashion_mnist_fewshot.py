"""Few-shot protocol on Fashion-MNIST with EfficientNet-Lite0 features (offline: Debian's
dataset-fashion-mnist, or the IDX files in $FXJAX_DATA_DIR/fashion_mnist).

    python -m launch.train --config configs/fashion_mnist_fewshot.py --workdir runs/fmnist_fewshot
    python -m launch.train --config configs/fashion_mnist_fewshot.py --workdir runs/fmnist_fewshot_pixels \
        --config.backbone=pixels --config.image_size=28
"""

from fxjax.config import default_config


def get_config():
    config = default_config()
    config.backbone = "efficientnet-lite0"
    config.data.source = "fashion_mnist"
    # 28 px images: 96 px keeps the pre-trained filters useful at a tenth of 224 px's cost on a CPU.
    config.image_size = 96
    config.batch_size = 256
    config.eval_batch_size = 512
    config.num_epochs = 3
    config.fewshot.ks = (1, 5, 10, 25)
    config.fewshot.seeds = (0, 1, 2, 3, 4)
    config.fewshot.probe = "logistic"
    return config
