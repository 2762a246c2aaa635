"""The papers' downstream evaluations beyond classification (`config.evals.<name>.type`).

  retrieval           DINO Sec. 4.2.1: image retrieval (revisited Oxford / Paris), mAP   retrieval.py
  copy_detection      DINO Sec. 4.2.2: copy detection (Copydays), mAP                    retrieval.py
  video_propagation   DINO Sec. 4.2.3: DAVIS-2017 mask propagation, J&F                   video.py
  correspondence      SD-DINO: zero-shot keypoint transfer with fused features, PCK@α     correspondence.py
  segmentation        DINOv2 Sec. 7.4: linear segmentation probe, mIoU                    dense.py
  depth               DINOv2 Sec. 7.4: linear depth probe, RMSE                           dense.py

Each reads a documented folder layout (README "Downstream evaluations"); `common` holds what
they share (the frozen backbone on images of any size, image reading, progress bars).
"""
