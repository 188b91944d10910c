from PIL import Image
from skimage import data
from ssprompt import Predictor, evaluate, learn_prompts, load_sfm, open_dataset

sfm = load_sfm()                         # the packaged embedded SFM; or load_sfm("sam3", DIR)
run = learn_prompts(sfm, "novel", shots=4, steps=10, n_test=8, out="runs/novel")  # ssprompt train
test = open_dataset("novel", "test", n_test=8)                 # or "coco:PATH"
zero_shot = evaluate(sfm, None, test)                          # default prompts, same images
learned = evaluate(sfm, "runs/novel/prompts.safetensors", test)
print(f"mIoU {zero_shot['mIoU']:.1f} -> {learned['mIoU']:.1f}")

predictor = Predictor(sfm, "runs/novel/prompts.safetensors")  # classes: from the prompts file
Image.fromarray(data.astronaut()).save("photo.jpg")   # any image: 8/16-bit, gray, RGB(A), ...
pred = predictor.predict("photo.jpg")    # a path, or an array (H, W, 3) / (H, W); any size
print(pred.semantic.numpy().shape, pred.instances.masks.shape, pred.segments[:1])  # torch tensors
for image_id, p in predictor.predict_dataset(test, n=2):  # a COCO split: its own image ids, and
    print(image_id, p.semantic.shape)    # class index c is category test.category_ids[c]
