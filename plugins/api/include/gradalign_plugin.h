/* gradalign scorer plugin ABI, version 1 — for plugin authors in C, C++ or any language with a
 * C FFI. Mirrors plugins/api/src/abi.rs; Rust authors use the crate and `export_plugin!` instead.
 *
 * A plugin is a shared library exporting
 *     const GaPluginTable *gradalign_plugin_table(void);
 * (or `<stem>_plugin_table`, where lib<stem>.so is the file name). The host reads
 * `abi_version` first and refuses any other version. Scorers must not unwind or longjmp across
 * the boundary; return non-zero with a message instead. Higher score = predicted better; a
 * non-finite score is reported as an error by the host.
 */
#ifndef GRADALIGN_PLUGIN_H
#define GRADALIGN_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#define GA_ABI_VERSION 2u

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

typedef struct {
    uint32_t abi_version;
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
} GaInputs;

/* Returns 0 and writes *out, or non-zero and a NUL-terminated message (≤ err_len bytes). */
typedef int32_t (*GaScoreFn)(const GaInputs *inputs, double *out, char *err, size_t err_len);

typedef struct {
    const char *name;
    const char *description;
    uint64_t inputs;       /* GA_IN_* flags */
    GaScoreFn score;
} GaScorer;

typedef struct {
    uint32_t abi_version;  /* must stay the first field */
    uint32_t n_scorers;
    const char *plugin_name;
    const char *plugin_version;
    const GaScorer *scorers;
} GaPluginTable;

#endif /* GRADALIGN_PLUGIN_H */
