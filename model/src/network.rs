//! The trainable whole: the DAN model, the affinity centers and the store that names them.

use candle_core::{DType, Device, Var};

use crate::dan::{Dan, DanConfig};
use crate::loss::AffinityCenters;
use crate::optim::{Optimizer, OptimizerConfig};
use crate::store::ParamStore;

pub struct DanEac {
    pub store: ParamStore,
    pub dan: Dan,
    pub centers: AffinityCenters,
}

impl DanEac {
    /// A freshly initialised network. `num_centers` is normally `config.classes`; the official
    /// RAF-DB script used 8 (a confirmed bug, DAN#31) and can be reproduced with it.
    pub fn new(
        config: &DanConfig,
        num_centers: usize,
        device: &Device,
        dtype: DType,
        seed: u64,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(num_centers >= 2, "affinity centers: need at least 2 (the variance across centers is unbiased), got {num_centers}");
        let mut store = ParamStore::new(device, dtype, seed);
        let dan = Dan::new(&mut store, config)?;
        let centers = AffinityCenters::new(&mut store, num_centers, config.feat_channels())?;
        Ok(Self {
            store,
            dan,
            centers,
        })
    }

    pub fn num_centers(&self) -> usize {
        self.centers.centers.dim(0).unwrap_or(0)
    }

    /// Model parameters then the centers, as `torch.optim` sees them.
    pub fn trainable(&self) -> Vec<(String, Var)> {
        self.store
            .params()
            .map(|e| (e.name.clone(), e.var.clone()))
            .collect()
    }

    pub fn optimizer(&self, config: OptimizerConfig) -> Optimizer {
        Optimizer::new(config, self.trainable())
    }
}
