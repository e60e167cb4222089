//! The four loss terms (spec section 2), in the official code's order of operations.

use candle_core::{DType, Result, Tensor, Var, D};

use crate::ops::second_axis;
use crate::store::{Init, ParamStore};

/// sys.float_info.epsilon, added to the head variance of the partition loss (spec 2.3).
pub const PARTITION_EPS: f64 = 2.220446049250313e-16;
/// Clamp bounds of the affinity loss (spec 2.2).
pub const AFFINITY_CLAMP: (f64, f64) = (1e-12, 1e12);

/// Cross entropy on the BN'd logits, mean over the batch. `labels` are u32 class indices.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    candle_nn::loss::cross_entropy(logits, labels)
}

/// The affinity loss's learnable class centers `affinity.centers` [num_centers, C], N(0,1).
pub struct AffinityCenters {
    pub centers: Var,
}

impl AffinityCenters {
    pub fn new(
        store: &mut ParamStore,
        num_centers: usize,
        feat_channels: usize,
    ) -> anyhow::Result<Self> {
        let centers = store.param(
            "affinity.centers",
            &[num_centers, feat_channels],
            Init::Normal { std: 1.0 },
        )?;
        Ok(Self { centers })
    }

    /// L_af on the backbone map F [B,C,h,w] (spatially averaged first).
    pub fn loss(&self, feat: &Tensor, labels: &Tensor) -> Result<Tensor> {
        // The spatial mean as a product with a ones column: Candle's reduction over the two
        // small trailing axes was ~2x slower, forward and backward.
        let (b, c, h, w) = feat.dims4()?;
        let ones = Tensor::ones((h * w, 1), feat.dtype(), feat.device())?;
        let mean = (feat
            .reshape((b * c, h * w))?
            .matmul(&ones)?
            .reshape((b, c))?
            / (h * w) as f64)?;
        affinity_loss(&mean, self.centers.as_tensor(), labels)
    }
}

/// L_af = sum(clamp(onehot(y) * (|f|^2 + |c|^2 - 2 f c^T) / sum_d var_k(c), 1e-12, 1e12)) / B.
/// The distance uses the expanded form and the variance of the centers is unbiased, across
/// classes, summed over dimensions; the gradient reaches the centers through both.
pub fn affinity_loss(f: &Tensor, centers: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let b = f.dim(0)?;
    let num_centers = centers.dim(0)?;
    let f_sq = f.sqr()?.sum_keepdim(1)?; // [B,1]
    let c_sq = centers.sqr()?.sum(1)?.unsqueeze(0)?; // [1,K]
    let cross = f.matmul(&centers.t()?)?; // [B,K]
    let dist = f_sq.broadcast_add(&c_sq)?.broadcast_sub(&(cross * 2.0)?)?;
    let mask = one_hot(labels, num_centers, f.dtype())?;
    let sigma2 = centers.var(0)?.sum_all()?;
    let dist = (dist * mask)?.broadcast_div(&sigma2)?;
    dist.clamp(AFFINITY_CLAMP.0, AFFINITY_CLAMP.1)?.sum_all()? / b as f64
}

/// One-hot rows [B, n] of `labels` (u32), as `dtype`. Labels >= n give an all-zero row.
pub fn one_hot(labels: &Tensor, n: usize, dtype: DType) -> Result<Tensor> {
    let classes = Tensor::arange(0u32, n as u32, labels.device())?.unsqueeze(0)?;
    labels.unsqueeze(1)?.broadcast_eq(&classes)?.to_dtype(dtype)
}

/// L_pt = log(1 + K / (mean_{b,c} var_k(H) + eps)) on the post-log-softmax heads [B,K,C];
/// 0 for a single head.
pub fn partition_loss(heads: &Tensor) -> Result<Tensor> {
    let k = heads.dim(1)?;
    if k <= 1 {
        return Tensor::zeros((), heads.dtype(), heads.device());
    }
    // Candle's `var(1)` (unbiased), from the fast sums over axis 1 (ops::second_axis).
    let mean = (second_axis::sum_axis1(heads, true)? / k as f64)?;
    let squares = heads.broadcast_sub(&mean)?.sqr()?;
    let v = (second_axis::sum_axis1(&squares, false)? / (k - 1) as f64)?.mean_all()?;
    ((v + PARTITION_EPS)?.recip()? * k as f64)?
        .affine(1.0, 1.0)?
        .log()
}

/// Exact mirror along the width (last) axis.
pub fn flip_w(t: &Tensor) -> Result<Tensor> {
    crate::ops::flip::flip_last(t)
}

/// L_c = mean over all B*K*h*w of (M - flip_w(M_f))^2: the CAM of the flipped input, flipped
/// back, must match the CAM of the input.
pub fn flip_consistency_loss(cam: &Tensor, cam_of_flipped: &Tensor) -> Result<Tensor> {
    (cam - flip_w(cam_of_flipped)?)?.sqr()?.mean_all()
}

/// Index of the largest logit per row, as u32 [B].
pub fn predictions(logits: &Tensor) -> Result<Tensor> {
    logits.argmax(D::Minus1)
}
