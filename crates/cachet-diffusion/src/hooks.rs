//! [`CacheHooks`]: the registry that attaches one caching method to a hookable DiT and answers
//! the model's [`DitHooks`] calls, with cache contexts, the loop's step/timestep and the log.

use crate::models::{
    BlockFn, BlockGroup, BlockStates, DenoiserFn, DenoiserOutput, DitHooks, HookableDit, ModuleFn,
    ModulePath,
};
use burn::tensor::Tensor;
use cachet_nn::ModelError;
use serde::{Deserialize, Serialize};

use crate::error::{DiffusionError, Result};
use crate::log::{Action, Decision, DecisionLog, StepInfo};
use crate::methods::calibrator::CalibratorConfig;
use crate::methods::dbcache::{BlockAdapter, DBCacheConfig, DbCache, UnitStats};
use crate::methods::dbprune::{DBPruneConfig, DbPrune, PruneStats};
use crate::methods::faster_cache::{FasterCacheAttention, FasterCacheConfig, FasterCacheDenoiser};
use crate::methods::first_block::{FirstBlockCache, FirstBlockCacheConfig};
use crate::methods::magcache::{MagCache, MagCacheCalibration, MagCacheConfig};
use crate::methods::pab::{Pab, PyramidAttentionBroadcastConfig};
use crate::methods::taylorseer::{TaylorSeerCache, TaylorSeerCacheConfig};
use crate::methods::textkv::{self, TextKVCacheConfig};
use crate::methods::{BlockMethod, GroupLayout, ModuleMethod};

/// Which method to attach, with its configuration (JSON: `{"method": "dbcache", ...}`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "lowercase", deny_unknown_fields)]
pub enum CacheConfig {
    /// No caching: every block runs (the hooks still log, for overhead measurements).
    None,
    /// Pyramid Attention Broadcast (diffusers).
    Pab(PyramidAttentionBroadcastConfig),
    /// FasterCache (diffusers).
    FasterCache(FasterCacheConfig),
    /// FirstBlockCache (diffusers).
    FbCache(FirstBlockCacheConfig),
    /// DBCache (cache-dit), optionally with a calibrator (TaylorSeer, FoCa or DMD).
    DbCache {
        /// cache-dit's `cache_config`.
        #[serde(default)]
        cache_config: DBCacheConfig,
        /// cache-dit's `calibrator_config`, by `calibrator_type`.
        #[serde(default)]
        calibrator_config: Option<CalibratorConfig>,
        /// cache-dit's `BlockAdapter`.
        #[serde(default)]
        adapter: BlockAdapter,
    },
    /// TaylorSeer cache (diffusers' standalone hook).
    TaylorSeer(TaylorSeerCacheConfig),
    /// MagCache (diffusers).
    MagCache(MagCacheConfig),
    /// TextKV (diffusers): refused on the DiTs here, where it would not be lossless.
    TextKv(TextKVCacheConfig),
    /// DBPrune, dynamic block pruning (cache-dit), optionally with a calibrator.
    DbPrune {
        /// cache-dit's `cache_config` (a `DBPruneConfig`).
        #[serde(default)]
        cache_config: DBPruneConfig,
        /// cache-dit's `calibrator_config`, by `calibrator_type`.
        #[serde(default)]
        calibrator_config: Option<CalibratorConfig>,
        /// cache-dit's `BlockAdapter`.
        #[serde(default)]
        adapter: BlockAdapter,
    },
}

impl CacheConfig {
    /// The method's short name (`none`, `pab`, `fastercache`, `fbcache`, `dbcache`,
    /// `taylorseer`, `magcache`, `textkv`, `dbprune`).
    pub fn method(&self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Pab(_) => "pab",
            Self::FasterCache(_) => "fastercache",
            Self::FbCache(_) => "fbcache",
            Self::DbCache { .. } => "dbcache",
            Self::TaylorSeer(_) => "taylorseer",
            Self::MagCache(_) => "magcache",
            Self::TextKv(_) => "textkv",
            Self::DbPrune { .. } => "dbprune",
        }
    }

    /// Default configuration of a method by name; `options` (a JSON object of the method's
    /// fields, or for `dbcache`/`dbprune` of `cache_config`/`calibrator_config`/`adapter`)
    /// overrides it.
    pub fn from_name(name: &str, options: Option<&str>) -> Result<Self> {
        let mut value = serde_json::json!({ "method": name });
        if let Some(options) = options {
            let parsed: serde_json::Value =
                serde_json::from_str(options).map_err(|e| DiffusionError::Config {
                    what: "cache",
                    reason: e.to_string(),
                })?;
            let Some(fields) = parsed.as_object() else {
                return Err(DiffusionError::Config {
                    what: "cache",
                    reason: "--cache-config must be a JSON object".into(),
                });
            };
            for (k, v) in fields {
                value[k] = v.clone();
            }
        }
        serde_json::from_value(value).map_err(|e| DiffusionError::Config {
            what: "cache",
            reason: e.to_string(),
        })
    }
}

/// Module-level hooks plus what every hook reads: the step and the log. Block-level methods
/// hand this to the blocks they run, so attention layers stay hookable inside them.
pub(crate) struct ModuleHooks {
    pub(crate) step: StepInfo,
    pub(crate) log: DecisionLog,
    method: Option<Box<dyn ModuleMethod>>,
}

impl std::fmt::Debug for ModuleHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModuleHooks")
            .field("step", &self.step)
            .field("method", &self.method.as_ref().map(|m| m.name()))
            .finish()
    }
}

impl DitHooks for ModuleHooks {
    fn hooks_module(&self, path: ModulePath<'_>) -> bool {
        self.method
            .as_ref()
            .is_some_and(|m| m.hooks(&path.to_string()))
    }

    fn run_module(
        &mut self,
        path: ModulePath<'_>,
        batch: usize,
        run: &mut ModuleFn<'_>,
    ) -> cachet_nn::Result<Vec<Tensor<3>>> {
        let name = path.to_string();
        let Some(method) = self.method.as_mut() else {
            return run();
        };
        if !method.hooks(&name) {
            return run();
        }
        let (output, action) = method.run(&self.step, &name, batch, run)?;
        self.log.push(Decision {
            step: self.step.step,
            context: self.step.context.clone().unwrap_or_default(),
            target: name,
            group: None,
            action,
            computed_blocks: usize::from(action == Action::Computed),
            total_blocks: 1,
            diff: None,
        });
        Ok(output)
    }
}

/// A caching method attached to a hookable DiT. Pass it as the model's `&mut dyn DitHooks`.
pub struct CacheHooks {
    config: CacheConfig,
    layout: GroupLayout,
    modules: ModuleHooks,
    blocks: Option<Box<dyn BlockMethod>>,
    db: Option<DbCache>,
    mag: Option<MagCache>,
    prune: Option<DbPrune>,
    denoiser: Option<FasterCacheDenoiser>,
}

impl std::fmt::Debug for CacheHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheHooks")
            .field("method", &self.config.method())
            .field("step", &self.modules.step)
            .finish()
    }
}

impl CacheHooks {
    /// Attaches `config` to `model`, resolving identifiers against its modules and block lists.
    pub fn new(model: &dyn HookableDit, config: CacheConfig) -> Result<Self> {
        let groups = model.block_groups();
        let layout = GroupLayout::new(&groups);
        let points = model.hook_points();
        let mut module_method: Option<Box<dyn ModuleMethod>> = None;
        let mut blocks: Option<Box<dyn BlockMethod>> = None;
        let mut db = None;
        let mut mag = None;
        let mut prune = None;
        let mut denoiser = None;
        match &config {
            CacheConfig::None => {}
            CacheConfig::Pab(c) => module_method = Some(Box::new(Pab::attach(c, &points)?)),
            CacheConfig::FasterCache(c) => {
                module_method = Some(Box::new(FasterCacheAttention::attach(c, &points)?));
                denoiser = Some(FasterCacheDenoiser::new(c)?);
            }
            CacheConfig::FbCache(c) => {
                blocks = Some(Box::new(FirstBlockCache::attach(c, layout.clone())?))
            }
            CacheConfig::DbCache {
                cache_config,
                calibrator_config,
                adapter,
            } => {
                db = Some(DbCache::attach(
                    cache_config,
                    calibrator_config.as_ref(),
                    adapter,
                    &layout,
                )?)
            }
            CacheConfig::TaylorSeer(c) => {
                module_method = Some(Box::new(TaylorSeerCache::attach(c, &points)?))
            }
            CacheConfig::MagCache(c) => mag = Some(MagCache::attach(c, layout.clone())?),
            CacheConfig::TextKv(_) => return Err(textkv::not_applicable(&layout)),
            CacheConfig::DbPrune {
                cache_config,
                calibrator_config,
                adapter,
            } => {
                prune = Some(DbPrune::attach(
                    cache_config,
                    calibrator_config.as_ref(),
                    adapter,
                    &layout,
                )?)
            }
        }
        tracing::info!(method = config.method(), "cache hooks attached");
        Ok(Self {
            config,
            layout,
            modules: ModuleHooks {
                step: StepInfo::default(),
                log: DecisionLog::default(),
                method: module_method,
            },
            blocks,
            db,
            mag,
            prune,
            denoiser,
        })
    }

    /// The attached configuration.
    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    /// The model's block lists as the hooks see them.
    pub fn layout(&self) -> &GroupLayout {
        &self.layout
    }

    /// Enters cache context `name` (diffusers' `cache_context`): per-context methods keep
    /// `cond` and `uncond` state apart.
    pub fn cache_context(&mut self, name: &str) {
        self.modules.step.context = Some(name.to_string());
    }

    /// Leaves the cache context.
    pub fn clear_context(&mut self) {
        self.modules.step.context = None;
    }

    /// Tells the hooks which step the next model call(s) belong to.
    pub fn begin_step(&mut self, step: usize, timestep: f64) {
        self.modules.step.step = step;
        self.modules.step.timestep = Some(timestep);
    }

    /// Current step information.
    pub fn step(&self) -> &StepInfo {
        &self.modules.step
    }

    /// Forgets all cached state and the log: call before each new inference.
    pub fn reset(&mut self) {
        if let Some(m) = self.modules.method.as_mut() {
            m.reset();
        }
        if let Some(b) = self.blocks.as_mut() {
            b.reset();
        }
        if let Some(d) = self.db.as_mut() {
            d.reset();
        }
        if let Some(m) = self.mag.as_mut() {
            m.reset();
        }
        if let Some(p) = self.prune.as_mut() {
            p.reset();
        }
        if let Some(d) = self.denoiser.as_mut() {
            d.reset();
        }
        self.modules.log.clear();
        self.modules.step = StepInfo::default();
    }

    /// Every decision made since the last reset.
    pub fn log(&self) -> &DecisionLog {
        &self.modules.log
    }

    /// Per-unit statistics of DBCache (empty for other methods).
    pub fn dbcache_stats(&self) -> Vec<UnitStats> {
        self.db.as_ref().map(DbCache::stats).unwrap_or_default()
    }

    /// Per-unit statistics of DBPrune (empty for other methods).
    pub fn dbprune_stats(&self) -> Vec<PruneStats> {
        self.prune.as_ref().map(DbPrune::stats).unwrap_or_default()
    }

    /// What MagCache's calibration (`calibrate: true`) recorded, per cache context: the
    /// `mag_ratios` to pass to later runs. Empty for other methods and without calibration.
    pub fn magcache_calibration(&self) -> Vec<MagCacheCalibration> {
        self.mag
            .as_ref()
            .map(MagCache::calibration)
            .unwrap_or_default()
    }

    /// Bytes of tensors the method currently holds (residuals, cached outputs, forecasts).
    pub fn memory_bytes(&self) -> usize {
        self.modules.method.as_ref().map_or(0, |m| m.memory_bytes())
            + self.blocks.as_ref().map_or(0, |b| b.memory_bytes())
            + self.db.as_ref().map_or(0, |d| d.memory_bytes())
            + self.mag.as_ref().map_or(0, |m| m.memory_bytes())
            + self.prune.as_ref().map_or(0, |p| p.memory_bytes())
            + self
                .denoiser
                .as_ref()
                .map_or(0, FasterCacheDenoiser::memory_bytes)
    }
}

impl DitHooks for CacheHooks {
    fn run_denoiser(
        &mut self,
        batch: usize,
        run: &mut DenoiserFn<'_>,
    ) -> cachet_nn::Result<DenoiserOutput> {
        let Some(denoiser) = self.denoiser.as_ref() else {
            return run(self, None);
        };
        let plan = denoiser.plan(&self.modules.step, batch)?;
        let output = run(self, plan.rows.clone())?;
        let denoiser = self.denoiser.as_mut().ok_or_else(|| {
            ModelError::from(DiffusionError::State(
                "FasterCache denoiser state vanished".into(),
            ))
        })?;
        let output = denoiser.finish(&plan, output)?;
        self.modules.log.push(Decision {
            step: self.modules.step.step,
            context: self.modules.step.context.clone().unwrap_or_default(),
            target: "denoiser".into(),
            group: None,
            action: if plan.rows.is_some() {
                Action::UncondSkipped
            } else {
                Action::Computed
            },
            computed_blocks: 1,
            total_blocks: 1,
            diff: None,
        });
        Ok(output)
    }

    fn run_blocks(
        &mut self,
        group: BlockGroup<'_>,
        states: BlockStates,
        block: &mut BlockFn<'_>,
    ) -> cachet_nn::Result<BlockStates> {
        if let Some(db) = self.db.as_mut() {
            return Ok(db.run_blocks(&mut self.modules, group, states, block)?);
        }
        if let Some(mag) = self.mag.as_mut() {
            return Ok(mag.run_blocks(&mut self.modules, group, states, block)?);
        }
        if let Some(prune) = self.prune.as_mut() {
            return Ok(prune.run_blocks(&mut self.modules, group, states, block)?);
        }
        if let Some(method) = self.blocks.as_mut() {
            return Ok(method.run_blocks(&mut self.modules, group, states, block)?);
        }
        let mut states = states;
        for i in 0..group.len {
            states = block(&mut self.modules, i, states)?;
        }
        Ok(states)
    }

    fn hooks_module(&self, path: ModulePath<'_>) -> bool {
        self.modules.hooks_module(path)
    }

    fn run_module(
        &mut self,
        path: ModulePath<'_>,
        batch: usize,
        run: &mut ModuleFn<'_>,
    ) -> cachet_nn::Result<Vec<Tensor<3>>> {
        self.modules.run_module(path, batch, run)
    }
}
