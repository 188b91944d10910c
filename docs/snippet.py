from ssprompt import Predictor, evaluate, learn_prompts, load_sfm, open_dataset

sfm = load_sfm()                         # the packaged embedded SFM (or load_sfm("sam3", DIR))
run = learn_prompts(sfm, "shift", shots=16, steps=40, n_prompts=25, n_test=20)
print(run.metrics["mIoU"], run.metrics["selection"]["selected"])   # test score, kept step
run.save("runs/shift")                   # prompts.safetensors, metrics.json, curves.png, ...

test = open_dataset("shift", "test", n_test=20)              # or "coco:PATH"
zero_shot = evaluate(sfm, None, test, n_prompts=25)          # default prompts, same images
learned = evaluate(sfm, "runs/shift/prompts.safetensors", test)
print(f"mIoU {zero_shot['mIoU']:.1f} -> {learned['mIoU']:.1f}")

pred = Predictor(sfm, run).predict(test[0].image)            # uint8 (H, W, 3), any size
print(pred.semantic.shape, run.class_names[int(pred.instances.categories[0])])
