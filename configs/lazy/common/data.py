"""COCO 2017 data loaders as the YAML configs build them (configs/base/common.yaml).

detectron2's common/data/coco.py with pvt_d2's
:class:`~pvt_d2.data.mapper.RobustDatasetMapper` (a bad image is skipped in
training, named in evaluation), RGB images, 16 images per batch and the 1x
resize: short side 800, long side at most 1333, horizontal flips. A config
file restates the batch size and training augmentations of its recipe. Set the
datasets by name: ``dataloader.train.dataset.names=[my_train]``
``dataloader.test.dataset.names=my_val`` (the evaluator follows the test set).
"""
from detectron2.config import LazyCall as L
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.data import transforms as T
from detectron2.evaluation import COCOEvaluator
from omegaconf import OmegaConf

from pvt_d2.data.mapper import RobustDatasetMapper
from pvt_d2.lazy import dataset_dicts

dataloader = OmegaConf.create()

dataloader.train = L(build_detection_train_loader)(
    dataset=L(dataset_dicts)(names=["coco_2017_train"], filter_empty=True),
    mapper=L(RobustDatasetMapper)(
        is_train=True,
        augmentations=[
            L(T.ResizeShortestEdge)(short_edge_length=[800], max_size=1333, sample_style="choice"),
            L(T.RandomFlip)(horizontal=True),
        ],
        image_format="RGB",
        use_instance_mask=True,
    ),
    total_batch_size=16,
    num_workers=4,
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(dataset_dicts)(names="coco_2017_val", filter_empty=False),
    mapper=L(RobustDatasetMapper)(
        is_train=False,
        augmentations=[L(T.ResizeShortestEdge)(short_edge_length=800, max_size=1333)],
        image_format="${...train.mapper.image_format}",
    ),
    num_workers="${..train.num_workers}",
)

# predictions under the run's folder (detectron2's default, ./output/..., would be shared by every run)
dataloader.evaluator = L(COCOEvaluator)(dataset_name="${..test.dataset.names}",
                                        output_dir="${train.output_dir}/inference")
