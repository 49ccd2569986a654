import numpy as np
import tensorflow_datasets as tfds

import keras_solov2  # noqa: F401
from keras_solov2.data import SOLOv2CocoConfig, load_coco, make_tfds_dataset


def test_tfds_build_of_real_coco_subset(shared_dir, tmp_path):
    root = shared_dir / "data" / "coco_train_mini"
    ann = root / "annotations" / "instances_train2017.json"
    config = SOLOv2CocoConfig(name="coco_train_mini", annotation_file=str(ann), image_dir=str(root / "train2017"))
    builder = tfds.builder("solov2_coco", config=config, data_dir=str(tmp_path))
    builder.download_and_prepare()
    info = builder.info
    assert info.splits["train"].num_examples == 160
    assert len(info.metadata["category_ids"]) == 80 and info.metadata["category_ids"][-1] == 90
    assert info.metadata["class_names"][79] == "toothbrush"

    coco = load_coco(ann)
    ds = builder.as_dataset(split="train")
    total, crowd, checked = 0, 0, 0
    for ex in tfds.as_numpy(ds):
        objs = ex["objects"]
        total += len(objs["label"])
        crowd += int(objs["is_crowd"].sum())
        if checked < 3:  # masks equal pycocotools' annToMask, in annotation order
            anns = [a for a in coco.imgToAnns[int(ex["image/id"])] if coco.annToMask(a).any()]
            for a, m, cat, lab in zip(anns, objs["mask"], objs["category_id"], objs["label"]):
                np.testing.assert_array_equal(m[..., 0], coco.annToMask(a))
                assert cat == a["category_id"] and info.metadata["category_ids"][lab] == cat
            checked += 1
    assert total == 1444 and crowd > 0  # every official annotation (none is empty here), crowds marked

    batches = make_tfds_dataset(ds.take(2), scale=(320, 320), batch_size=2, max_instances=50, training=False)
    x, y = next(iter(batches))
    assert x["images"].shape == (2, 320, 320, 3) and y["gt_masks"].shape == (2, 50, 320, 320)
    labels = np.asarray(y["gt_labels"])
    assert (labels >= 0).any() and set(np.unique(np.asarray(y["gt_masks"]))) <= {0, 1}
