"""Every default that export and runtime share, in one place.

A bundle's manifest records the values it was built with; the runtime reads
those, never these. These are what ``mrad-export`` writes when not told
otherwise, and what the spec (``docs/METHOD.md``) prescribes.
"""

# Spec section 1: the input side and OpenAI CLIP's normalisation.
IMAGE_SIZE = 518
RESAMPLE = "bicubic"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Images (and masks) of more pixels than this are refused from their header, before decoding:
# a decompression bomb cannot exhaust memory. 100 MP is above any line camera in common use.
MAX_IMAGE_PIXELS = 100_000_000
# And sides above this (JPEG's and WebP's own limit): a forged header of 1 x 8,000,000 is no frame.
MAX_IMAGE_SIDE = 65_535
# A resized ground-truth mask is binarised again above this value.
MASK_THRESHOLD = 0.5

# Spec section 2.7: patch features are the mean of average pools of these sizes.
SMOOTHING_KERNELS = (1, 3, 5)

# Spec section 4: the map and the image score.
IMAGE_WEIGHT = 0.7
SIGMA = 4.0
TRUNCATE = 4.0
TOP_FRACTION = 0.01

# Retrieval: "exact" is the spec's softmax over every entry; "hnsw" takes the
# softmax over the top_k entries an hnswlib index finds.
RETRIEVAL_MODES = ("exact", "hnsw")
RETRIEVAL = "exact"
TOP_K = 64

# hnswlib parameters: generous, memories hold thousands of entries, not millions.
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 128
# Fixed seed and one insertion thread: the same keys always give the same graph.
HNSW_SEED = 100

# The line's own memories (mrad-enroll): patch tokens pooled at these scales
# (spec section 2.7's neighbourhoods, kept apart instead of averaged).
ENROLL_SCALES = (1, 3, 5)
# Fusion with the zero-shot map and image probability: weight of the enrolled side.
# Map weight measured on generated data (tiny model @ 224, 4 shots, two seeds): 0.75 gave the best
# image + pixel AUROC of 0 / 0.25 / 0.5 / 0.75 / 1.0 on both (docs/BENCHMARKS.md). The image weight
# could not be measured there (the random-weight model's image features are nearly identical), so
# it stays at an even mix.
ENROLL_MAP_WEIGHT = 0.75
ENROLL_IMAGE_WEIGHT = 0.5
# Dual memory: temperature of the sigmoid that weighs the distance to the nearest
# normal entry against the distance to the nearest defect entry.
DUAL_TEMPERATURE = 0.05
# Entries per memory level before greedy coreset subsampling (16 shots of
# ViT-L-14-336 @ 518 give 21,904 patches per scale).
ENROLL_CAP = 16384
# Below this many entries a level is searched exactly; from it on through hnswlib (when installed).
# Measured at ViT-L-14-336 @ 518 sizes (1,369 queries of 1,024, 2 cores with AVX-512 and AMX):
# exact 145 / 281 / 572 ms per frame at 5,476 / 10,952 / 21,904 entries per scale, hnsw about 215.
ENROLL_EXACT_BELOW = 8192
# hnswlib for the line's own memories: nearest-neighbour queries (k = 1) over
# thousands of patches need a smaller beam than the zero-shot top-64.
ENROLL_HNSW_EF_CONSTRUCTION = 64
ENROLL_HNSW_EF_SEARCH = 32
# Enrollment versions kept on disk for --rollback.
ENROLL_KEEP_VERSIONS = 5

# Spec section 6, MRAD-CLIP: patches whose FT pixel share is above this form the anomalous region prior;
# patch-text similarities are divided by the temperature before their softmax.
CLIP_PRIOR_THRESHOLD = 0.5
CLIP_TEMPERATURE = 0.07
# The prompts: a normal and an anomalous state of one class name, each after learned context tokens;
# deep prompts replace the tokens after SOT in the first text blocks (after block 0).
CLIP_CLASS_NAME = "object"
CLIP_STATES = ("{}", "damaged {}")
CLIP_CONTEXT_TOKENS = 12
CLIP_DEEP_TOKENS = 4
CLIP_DEEP_LAYERS = 8
# The reference casts the deep prompts to float16 before inserting them; "none" keeps float32.
CLIP_DEEP_ROUNDING = "float16"

# Scenes of many parts (--objects): a memory of single parts beside the global one (runtime/objects.py).
# The built-in segmenter: foreground where a pixel's colour is farther from the background colour than
# OBJECT_THRESHOLD times the background's own 99th-percentile spread, and at least OBJECT_MIN_CONTRAST
# 8-bit levels (a perfectly flat background has no spread to scale).
OBJECT_THRESHOLD = 3.0
OBJECT_MIN_CONTRAST = 20.0
# Parts smaller or larger than these fractions of the frame are not parts (specks, the whole tray).
OBJECT_MIN_AREA = 0.002
OBJECT_MAX_AREA = 0.5
# Morphology (opening, then closing) with a square of this fraction of the frame's shorter side, at least 3 px.
OBJECT_MORPHOLOGY = 0.02
# A crop is the part's box grown by this fraction of its longer side on each side, made square.
OBJECT_MARGIN = 0.15
# Crops are masked to this colour outside the part: OpenAI CLIP's mean, which normalises to zero.
OBJECT_FILL = (123, 117, 104)
# A SAM-family segmenter: prompts on a grid of this many points a side; masks kept above this predicted
# IoU; non-maximum suppression of boxes overlapping more than this (SAM's automatic mask generator's own).
OBJECT_POINTS_PER_SIDE = 16
OBJECT_PREDICTED_IOU = 0.8
OBJECT_NMS_IOU = 0.7
# Fusion: inside each part, this share of the enrolled map comes from the per-part memory instead of the
# global one; p_img takes this share of the largest per-part image distance. Measured on generated trays
# (tiny model @ 224, 8 shots, capsules and pins, seed 1; docs/BENCHMARKS.md, "Scenes of many parts"): map
# weights 0.25 / 0.5 / 0.75 / 1.0 gave image AUROC 93.0 / 95.3 / 94.5 / 93.4 (global alone 81.2), pixel
# AUROC 99.9 for all (99.4). The image weight could not be measured there (the random-weight model's image
# features are nearly identical: 0 and 0.5 both gave 95.3), so the part memory stays out of p_img.
OBJECT_MAP_WEIGHT = 0.5
OBJECT_IMAGE_WEIGHT = 0.0
# A frame is flagged when its part count lies outside the enrolled normal counts widened by this many.
OBJECT_COUNT_TOLERANCE = 0
# Part crops per encoder call (a frame of a tray may hold dozens).
OBJECT_BATCH = 16
# Parts scored per frame at most: a cluttered frame past it is anomalous by its count, and costs no more.
OBJECT_MAX_PARTS = 64

# The line (mrad-run, mrad-serve --camera, the station file): what each setting is when nobody sets it.
# A lost camera may stay away this long before it is given up.
RECONNECT_TIMEOUT_S = 60.0
# At the end of a run, MQTT and webhooks get this long to deliver what they still hold.
FLUSH_TIMEOUT_S = 10.0
# MQTT: at least once; messages waiting for the broker at most before the oldest is dropped.
MQTT_QOS = 1
MQTT_BUFFER_SIZE = 10_000
# Webhooks POST anomalous frames only.
WEBHOOK_ON = "anomalous"
# A threshold is this quantile of the known-good scores (mrad-calibrate, enrolling, the operator's page).
CALIBRATION_QUANTILE = 0.99
