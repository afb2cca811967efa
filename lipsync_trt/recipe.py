"""Every constant of the SyncTalk_2D "328"/"ave" inference recipe (RECIPE.md), in one place."""

# §1 audio -> mel
SAMPLE_RATE = 16000          # Hz, what the mel and the encoder expect
N_FFT = 800
HOP_LENGTH = 200
WIN_LENGTH = 800
N_MELS = 80
FMIN = 55.0
FMAX = 7600.0
PREEMPHASIS = 0.97
MIN_LEVEL_DB = -100.0
REF_LEVEL_DB = 20.0
AMP_FLOOR = 1e-5
MAX_ABS_VALUE = 4.0
MEL_FPS = 80.0               # mel frames per second (16000 / 200)

# §2 mel windows -> audio features
FPS = 25.0                   # video frames per second
MEL_WINDOW = 16              # mel frames per encoder window
FEATURE_DIM = 512            # encoder output per window
MIN_SAMPLES = (MEL_WINDOW - 1) * HOP_LENGTH   # 3000: T = 1 + len // 200 must reach 16

# §3 feature window per video frame (mode "ave")
FEATURE_CONTEXT = 8          # rows [i - 8, i + 8) of the padded features
FEATURE_SHAPE = (32, 16, 16)
SAMPLES_PER_FRAME = int(SAMPLE_RATE / FPS)    # 640

# §5 face box from landmarks
LANDMARK_COUNT = 110
LM_XMIN = 1                  # lm[1].x
LM_YMIN = 52                 # lm[52].y
LM_XMAX = 31                 # lm[31].x

# §6 generator input
CROP_SIZE = 328
ROI_SIZE = 320
ROI_OFFSET = 4               # roi = crop328[4:324, 4:324]
MASK_RECT = (5, 5, 310, 305)  # cv2.rectangle (x, y, w, h), filled black on the masked copy
CUBIC_A = -0.75              # OpenCV INTER_CUBIC

# §9 networks
GENERATOR_CHANNELS = (32, 64, 128, 256, 512)
GENERATOR_IN_CHANNELS = 6
BN_EPS = 1e-5

# video defaults
DEFAULT_CRF = 20             # the reference's ffmpeg -crf 20
REFERENCE_PRESET = "medium"  # ffmpeg's default x264 preset, what the reference encodes with
DEFAULT_PRESET = "veryfast"  # ours: ~3x less encode time than medium on a 2-core CPU at a similar size (docs/BENCHMARKS.md)
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")
