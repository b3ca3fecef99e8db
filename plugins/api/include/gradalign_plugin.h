/* gradalign scorer plugin ABI, version 7 — for plugin authors in C, C++ or any language with a
 * C FFI. Mirrors plugins/api/src/abi.rs; Rust authors use the crate and `export_plugin!` instead.
 *
 * A plugin is a shared library exporting the entry point declared below,
 *     GA_EXPORT const GaPluginTable *gradalign_plugin_table(void);
 * (or `<stem>_plugin_table`, where lib<stem>.so is the file name).
 *
 * Versions. The host reads `abi_version` first and loads versions GA_OLDEST_ABI_VERSION to
 * GA_ABI_VERSION. Growth is append-only: a new version adds fields at the end of GaPluginTable
 * and GaInputs only (never to GaScorer or GaParam, which sit in arrays) and `struct_size` says
 * how large the plugin's table is. Each scorer receives inputs stamped with the version its
 * table declared; fields of later versions are simply not read by an older plugin.
 *
 * Lifetimes and threads. `init` (may be NULL) runs once right after loading, before any scorer;
 * `teardown` (may be NULL) once after the last call, before the library is unloaded. `score` may
 * be called from several threads at once with the same `user_data`: scorers must be
 * thread-safe. Every pointer in GaInputs is valid only during that one `score` call; the table,
 * its strings and its scorer rows must stay valid while the library is loaded. Scorers must not
 * unwind or longjmp across the boundary; return non-zero with a message instead. Higher score =
 * predicted better; a non-finite score is reported as an error by the host.
 */
#ifndef GRADALIGN_PLUGIN_H
#define GRADALIGN_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define GA_ABI_VERSION 7u
#define GA_OLDEST_ABI_VERSION 2u

#if defined(_WIN32)
#define GA_EXPORT __declspec(dllexport)
#else
#define GA_EXPORT __attribute__((visibility("default")))
#endif

/* Input flags (GaScorer.inputs): the host computes only what the selected scorers declare and
 * passes NULL for everything a scorer did not declare. */
#define GA_IN_PER_SAMPLE_GRADS      (1ull << 0)  /* grads: N x n_columns, f32 or f64 (precision) */
#define GA_IN_LABELS                (1ull << 1)  /* labels: N int64 */
#define GA_IN_LOGITS                (1ull << 2)  /* logits: N x n_classes f64 */
#define GA_IN_PARAM_VALUES          (1ull << 3)  /* param_values: n_columns f64 */
#define GA_IN_BATCH_GRADS           (1ull << 4)  /* batch_grads: n_columns f64 (sum over samples) */
#define GA_IN_RELU_CODES            (1ull << 5)  /* relu_codes: N x n_relu_units bytes, 0/1 */
#define GA_IN_INPUT_JACOBIAN        (1ull << 6)  /* input_jacobian: N x input_numel f64 */
#define GA_IN_MODEL_INFO            (1ull << 7)  /* model_params, model_flops */
#define GA_IN_SYNFLOW_GRADS         (1ull << 8)  /* synflow_grads: n_columns f64 */
#define GA_IN_HESSIAN_GRAD_PRODUCT  (1ull << 9)  /* hessian_grad_product: n_columns f64 */
#define GA_IN_ALL_PARAMS            (1ull << 10) /* columns for every trainable parameter */
#define GA_IN_SIGNS                 (1ull << 11) /* packed gradient signs (sign_* fields) */
#define GA_IN_FEATURE_MAPS          (1ull << 12) /* ABI 4: every Conv output (feature_* fields) */
#define GA_IN_FEATURE_COVARIANCE    (1ull << 13) /* ABI 5: each Conv output's channel covariance */
#define GA_IN_LOGIT_JACOBIAN        (1ull << 14) /* ABI 6: d logits / d (element 0 of each tensor) */
#define GA_IN_BLOCK_JACOBIAN        (1ull << 15) /* ABI 7: block-to-block VJP matrices (AZ-NAS) */

#define GA_ROLE_WEIGHT 0u /* Conv / ConvTranspose / Gemm / MatMul weight */
#define GA_ROLE_BIAS   1u
#define GA_ROLE_OTHER  2u

#define GA_PRECISION_F32 0u
#define GA_PRECISION_F64 1u

typedef struct {
    const char *name;      /* ONNX initializer name */
    const char *node;      /* first node consuming it */
    const char *op_type;
    uint32_t role;         /* GA_ROLE_* */
    uint32_t ndim;
    const uint64_t *shape;
    int64_t channel_axis;  /* output-channel axis of a weight, -1 otherwise */
    uint64_t offset;       /* first gradient column */
    uint64_t numel;
} GaParam;

/* ABI 4: one layer of the feature maps: values offset .. offset + channels * spatial of a
   sample's row, channel-major. */
typedef struct {
    const char *node;      /* the ONNX node whose output it is */
    uint64_t channels;
    uint64_t spatial;      /* values per channel (H * W for a 2-D convolution) */
    uint64_t offset;
} GaFeatureLayer;

/* ABI 7: one pair of consecutive block outputs: a rows x cols row-major matrix at offset in
   block_jacobian (rows: the earlier output's channels x stride^2; cols: the later one's). */
typedef struct {
    uint64_t rows;
    uint64_t cols;
    uint64_t offset;
    uint64_t identity;     /* 1 when the product returned the random signs unchanged */
} GaBlockPair;

typedef struct {
    uint32_t abi_version;  /* the version of the plugin's own table */
    uint32_t precision;    /* of grads: GA_PRECISION_* */
    uint64_t n_samples;
    uint64_t n_columns;
    uint64_t n_classes;
    const GaParam *params;
    uint64_t n_params;
    const void *grads;
    const double *param_values;
    const double *batch_grads;
    const int64_t *labels;
    const double *logits;
    const uint8_t *relu_codes;
    uint64_t n_relu_units;
    const double *input_jacobian;
    uint64_t input_numel;
    const double *synflow_grads;
    const double *hessian_grad_product;
    double model_params;
    double model_flops;
    /* ABI 2: signs of the per-sample gradients as two bit-planes, N x sign_words uint64 each;
       bit c % 64 of word c / 64 is set in sign_pos where column c is > 0, in sign_neg where < 0.
       The class_* planes hold the sign of each class's mean gradient, one row per class
       present, ascending labels. */
    const uint64_t *sign_pos;
    const uint64_t *sign_neg;
    uint64_t sign_words;
    const uint64_t *class_sign_pos;
    const uint64_t *class_sign_neg;
    uint64_t n_sign_classes;
    /* ABI 3 */
    uint64_t struct_size;  /* sizeof(GaInputs) as the host built it */
    void *user_data;       /* the table's user_data */
    /* ABI 4 */
    const double *feature_maps;    /* N x n_feature_units f64 */
    uint64_t n_feature_units;
    const GaFeatureLayer *feature_layers; /* with FEATURE_MAPS or FEATURE_COVARIANCE */
    uint64_t n_feature_layers;
    /* ABI 5 */
    const double *feature_covariance; /* layer l: channels x channels f64, row-major, from
                                         sum_{j<l} channels_j^2; centred over samples and
                                         positions, divided by N * spatial */
    const uint8_t *feature_live;      /* n_feature_layers: 1 where the layer's output can change
                                         the logits, 0 where every path from it is multiplied
                                         by a constant zero */
    /* ABI 6 */
    const double *logit_jacobian;     /* N x n_classes x n_jacobian_tensors f64, row-major:
                                         d logit_c(x_i) / d theta_t[0] for every trainable
                                         float initializer (initializer order), BatchNorm at
                                         its running statistics */
    uint64_t n_jacobian_tensors;
    const double *eval_logits;        /* N x n_classes: that forward's logits */
    /* ABI 7 */
    const double *block_jacobian;     /* the pair matrices one after another, row-major */
    const GaBlockPair *block_pairs;   /* n_block_pairs, graph order */
    uint64_t n_block_pairs;
} GaInputs;

/* Returns 0 and writes *out, or non-zero and a NUL-terminated message (≤ err_len bytes). */
typedef int32_t (*GaScoreFn)(const GaInputs *inputs, double *out, char *err, size_t err_len);
/* Returns 0, or non-zero and a message: the plugin then fails to load with it. */
typedef int32_t (*GaInitFn)(void *user_data, char *err, size_t err_len);
typedef void (*GaTeardownFn)(void *user_data);

typedef struct {
    const char *name;
    const char *description;
    uint64_t inputs;       /* GA_IN_* flags */
    GaScoreFn score;
} GaScorer;

typedef struct {
    uint32_t abi_version;  /* must stay the first field: GA_ABI_VERSION */
    uint32_t n_scorers;
    const char *plugin_name;
    const char *plugin_version;
    const GaScorer *scorers;
    /* ABI 3 */
    uint32_t struct_size;  /* sizeof(GaPluginTable) */
    uint32_t reserved;     /* 0 */
    void *user_data;       /* handed to init, teardown and every scorer (GaInputs.user_data) */
    GaInitFn init;         /* may be NULL */
    GaTeardownFn teardown; /* may be NULL */
} GaPluginTable;

/* A table initialiser that fills the version and size fields:
 *     static const GaPluginTable table = GA_TABLE_INIT(n, "name", "1.0", scorers,
 *                                                      user_data, init, teardown); */
#define GA_TABLE_INIT(n_scorers, name, version, scorers, user_data, init, teardown) \
    { GA_ABI_VERSION, (n_scorers), (name), (version), (scorers), \
      (uint32_t)sizeof(GaPluginTable), 0u, (user_data), (init), (teardown) }

/* The entry point every plugin defines (this name, or <stem>_plugin_table). */
GA_EXPORT const GaPluginTable *gradalign_plugin_table(void);

#if defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L && UINTPTR_MAX == 0xffffffffffffffffu
/* The layout the host asserts on its side (64-bit targets). */
_Static_assert(sizeof(GaParam) == 64, "GaParam layout");
_Static_assert(sizeof(GaScorer) == 32, "GaScorer layout");
_Static_assert(offsetof(GaInputs, struct_size) == 200, "GaInputs ABI 2 prefix");
_Static_assert(offsetof(GaInputs, feature_maps) == 216, "GaInputs ABI 3 prefix");
_Static_assert(offsetof(GaInputs, feature_covariance) == 248, "GaInputs ABI 4 prefix");
_Static_assert(offsetof(GaInputs, logit_jacobian) == 264, "GaInputs ABI 5 prefix");
_Static_assert(offsetof(GaInputs, block_jacobian) == 288, "GaInputs ABI 6 prefix");
_Static_assert(sizeof(GaInputs) == 312, "GaInputs layout");
_Static_assert(sizeof(GaBlockPair) == 32, "GaBlockPair layout");
_Static_assert(sizeof(GaFeatureLayer) == 32, "GaFeatureLayer layout");
_Static_assert(offsetof(GaPluginTable, struct_size) == 32, "GaPluginTable ABI 2 prefix");
_Static_assert(sizeof(GaPluginTable) == 64, "GaPluginTable layout");
#endif

#ifdef __cplusplus
}
#endif

#endif /* GRADALIGN_PLUGIN_H */
