"""The embedded world: a tiny text-to-video model fastvader ships, trained on synthetic videos of
coloured shapes (``python -m fastvader.toy.train_world``), so the main job runs anywhere."""
