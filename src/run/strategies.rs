//! The strategies a spec can compare: one table that spec validation ([`crate::run::spec`]),
//! the plan ([`crate::run::plan`]) and the report ([`crate::report`]) all read, so a strategy
//! is added or renamed in one place.
//!
//! Each row says what the strategy is called in specs and `results.json`, how tables and
//! legends label it, which report group it belongs to, and how its student is made: the
//! `masa init` options, whether its genes are extracted without spectral alignment, and
//! whether it pre-trains with distillation. The sweeps of `[ablations]` add generated variants
//! of MASA ([`ratio_variant`], [`domain_variant`]).

use crate::init::scale::Components;
use crate::init::{GeneScale, InitOptions, Rest, Strategy};
use serde::{Deserialize, Serialize};

/// Where a run's results appear in the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Group {
    /// The main comparison (Tables 1 and 3, the curves).
    Main,
    /// Table 4's ablations.
    Ablation,
    /// Table 5: MASA at other M/W ratios (`ablations.ratios`).
    Ratio,
    /// Fig. 4: MASA calibrated on one domain (`ablations.calibration_domains`).
    Calibration,
    /// MASA at other adaptive-scaling settings (`ablations.scaling`).
    Scaling,
    /// Runs repeated on a second training engine (`pretrain.engine = ["masa", "torchrun"]`).
    Engine,
}

impl Group {
    /// The name `results.json` and the report use.
    pub fn name(self) -> &'static str {
        match self {
            Group::Main => "main",
            Group::Ablation => "ablation",
            Group::Ratio => "ratio",
            Group::Calibration => "calibration",
            Group::Scaling => "scaling",
            Group::Engine => "engine",
        }
    }
}

/// One row of [`STRATEGIES`].
#[derive(Clone, Copy, Debug)]
pub struct StrategyDef {
    /// The name in specs' `strategies` and in `results.json`.
    pub name: &'static str,
    /// Table and legend label.
    pub label: &'static str,
    pub group: Group,
    /// `masa init --strategy`.
    pub init: Strategy,
    /// `masa init --rest` (masa/naive only).
    pub rest: Rest,
    /// `masa init --gene-scale` (masa/naive only).
    pub gene_scale: GeneScale,
    /// False: the genes are extracted with λ = 0 (no spectral alignment).
    pub spectral: bool,
    /// Pre-train with distillation from the source (spec `[distill]`).
    pub distill: bool,
    /// `masa init --components` fixed by the strategy (else the spec's `[scaling]`).
    pub components: Option<Components>,
    /// `masa init --rotate-genes`: the control whose genes keep only their spectrum.
    pub rotate_genes: bool,
}

impl StrategyDef {
    const fn new(name: &'static str, label: &'static str, group: Group, init: Strategy) -> Self {
        StrategyDef {
            name,
            label,
            group,
            init,
            rest: Rest::Scratch,
            gene_scale: GeneScale::Frobenius,
            spectral: true,
            distill: false,
            components: None,
            rotate_genes: false,
        }
    }

    /// The `masa init` options of this strategy (seed 0; each run sets its own).
    pub fn init_options(&self) -> InitOptions {
        InitOptions {
            rest: self.rest,
            gene_scale: self.gene_scale,
            components: self.components,
            rotate_genes: self.rotate_genes,
            ..InitOptions::new(self.init)
        }
    }

    /// Whether the student is made from gene matrices (so the run needs an extraction).
    pub fn needs_genes(&self) -> bool {
        matches!(self.init, Strategy::Masa | Strategy::Naive)
    }
}

/// Every strategy a spec may name, in the order the report shows them: baselines first, MASA
/// last, as in the paper's tables.
pub const STRATEGIES: &[StrategyDef] = &[
    StrategyDef::new("scratch", "Scratch", Group::Main, Strategy::Scratch),
    StrategyDef::new("weight-selection", "Weight selection", Group::Main, Strategy::WeightSelection),
    StrategyDef::new("prune", "Pruning", Group::Main, Strategy::Prune),
    StrategyDef::new("eep", "Pruning (EEP)", Group::Main, Strategy::Eep),
    StrategyDef { distill: true, ..StrategyDef::new("distill", "Distillation", Group::Main, Strategy::Scratch) },
    StrategyDef { rest: Rest::WeightSelection, ..StrategyDef::new("hybrid", "MASA + selected rest", Group::Main, Strategy::Masa) },
    StrategyDef::new("naive", "MASA w/o adaptive scaling", Group::Ablation, Strategy::Naive),
    StrategyDef {
        spectral: false,
        ..StrategyDef::new("masa-no-spectral", "MASA w/o spectral alignment (λ = 0)", Group::Ablation, Strategy::Masa)
    },
    StrategyDef {
        gene_scale: GeneScale::None,
        ..StrategyDef::new("masa-paper-scale", "MASA, paper-literal gene scale", Group::Ablation, Strategy::Masa)
    },
    StrategyDef {
        components: Some(Components::All),
        ..StrategyDef::new("masa-submatrix", "MASA, r′ = r (a submatrix of each gene)", Group::Ablation, Strategy::Masa)
    },
    StrategyDef {
        rotate_genes: true,
        ..StrategyDef::new("masa-rotated", "MASA, genes randomly rotated (control: spectrum only)", Group::Main, Strategy::Masa)
    },
    StrategyDef::new("masa", "MASA", Group::Main, Strategy::Masa),
];

/// The row of a strategy name.
pub fn find(name: &str) -> Option<&'static StrategyDef> {
    STRATEGIES.iter().find(|s| s.name == name)
}

/// Position in the report's order; strategies not in the table (the sweeps' variants) after
/// every listed one.
pub fn report_rank(name: &str) -> usize {
    STRATEGIES.iter().position(|s| s.name == base_strategy(name)).unwrap_or(STRATEGIES.len())
}

/// A job's strategy name on a second training engine (`engine`: its name): `masa@torchrun`.
pub fn on_engine(name: &str, engine: &str) -> String {
    format!("{name}@{engine}")
}

/// The strategy a job name runs: `masa@torchrun` → `masa`; `masa` → `masa`.
pub fn base_strategy(name: &str) -> &str {
    name.split_once('@').map_or(name, |(base, _)| base)
}

/// The names in table order, for messages.
pub fn names() -> Vec<&'static str> {
    STRATEGIES.iter().map(|s| s.name).collect()
}

/// A strategy as a plan runs it: a table row, or a variant of MASA a sweep generates.
#[derive(Clone, Debug)]
pub struct Variant {
    /// The spec's strategy name, or `masa-ratio-<ρ>` / `masa-domain-<d>` for sweep variants.
    pub name: String,
    pub label: String,
    pub group: Group,
    pub init: InitOptions,
    pub needs_genes: bool,
    /// False: genes extracted with λ = 0.
    pub spectral: bool,
    pub distill: bool,
}

impl From<&StrategyDef> for Variant {
    fn from(s: &StrategyDef) -> Self {
        Variant {
            name: s.name.into(),
            label: s.label.into(),
            group: s.group,
            init: s.init_options(),
            needs_genes: s.needs_genes(),
            spectral: s.spectral,
            distill: s.distill,
        }
    }
}

/// Adaptive scaling of the MASA strategies' genes (Sec. 3.2; `masa init --components`,
/// `--coupled`); a strategy that fixes its own r' (`masa-submatrix`) keeps it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScalingSpec {
    /// r': `"all"`, a count, or `"energy:F"`; default [`crate::init::DEFAULT_COMPONENTS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub components: Option<crate::init::scale::Components>,
    /// One selection of the intermediate dimension shared by gate, up and down.
    #[serde(default)]
    pub coupled: bool,
    /// `a` of the separation of repeated neurons, in (0, 1]; default
    /// [`crate::init::scale::DEFAULT_REPLICA_NOISE`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_noise: Option<f64>,
}

/// Table 5's sweep: MASA with genes at M/W ratio `ratio`.
pub fn ratio_variant(ratio: f64) -> Variant {
    Variant { name: format!("masa-ratio-{ratio}"), label: format!("MASA, ratio {ratio}"), group: Group::Ratio, ..masa() }
}

/// Fig. 4's sweep: MASA with genes from statistics of one corpus domain.
pub fn domain_variant(domain: &str) -> Variant {
    Variant {
        name: format!("masa-domain-{domain}"),
        label: format!("MASA, calibrated on {domain} only"),
        group: Group::Calibration,
        ..masa()
    }
}

/// `[ablations] scaling`: MASA with another adaptive-scaling setting.
pub fn scaling_variant(sc: &ScalingSpec) -> Variant {
    let r = sc.components.unwrap_or(crate::init::DEFAULT_COMPONENTS);
    let coupled = if sc.coupled { "-coupled" } else { "" };
    let slug = match r {
        Components::All => "rall".to_string(),
        Components::Rank(k) => format!("r{k}"),
        Components::Energy(e) => format!("energy{e}"),
    };
    let noise = sc.replica_noise.map_or(String::new(), |a| format!("-noise{a}"));
    let mut v = Variant {
        name: format!("masa-{slug}{coupled}{noise}"),
        label: format!(
            "MASA, r′ = {r}{}{}",
            if sc.coupled { ", coupled" } else { "" },
            sc.replica_noise.map_or(String::new(), |a| format!(", replica noise {a}"))
        ),
        group: Group::Scaling,
        ..masa()
    };
    v.init.components = Some(r);
    v.init.coupled = sc.coupled;
    if let Some(a) = sc.replica_noise {
        v.init.replica_noise = a;
    }
    v
}

impl Variant {
    /// The spec's `[scaling]` for the MASA-family variants, where the variant does not fix r'.
    pub fn with_scaling(mut self, sc: &ScalingSpec) -> Self {
        if self.init.strategy == Strategy::Masa && self.group != Group::Scaling {
            if self.init.components.is_none() {
                self.init.components = sc.components;
            }
            self.init.coupled |= sc.coupled;
            if let Some(a) = sc.replica_noise {
                self.init.replica_noise = a;
            }
        }
        self
    }
}

fn masa() -> Variant {
    find("masa").expect("the table has masa").into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_every_gene_strategy_is_masa_or_naive() {
        let names = names();
        assert!(names.iter().enumerate().all(|(i, n)| !names[..i].contains(n)), "{names:?}");
        assert_eq!(names.last(), Some(&"masa"), "MASA is shown last");
        for s in STRATEGIES {
            assert_eq!(s.init_options().strategy, s.init);
            assert!(s.spectral || s.needs_genes(), "{}: λ = 0 only means something with genes", s.name);
        }
    }

    /// `[scaling]` reaches every MASA-family run except one that fixes its own r'; the sweep's
    /// variants carry their own setting and name it.
    #[test]
    fn scaling_spec_reaches_masa_variants() {
        let sc = ScalingSpec { components: Some(Components::Rank(64)), coupled: true, replica_noise: None };
        let v = |n: &str| Variant::from(find(n).unwrap()).with_scaling(&sc);
        for n in ["masa", "hybrid", "masa-no-spectral", "masa-paper-scale", "masa-rotated"] {
            assert_eq!((v(n).init.components, v(n).init.coupled), (Some(Components::Rank(64)), true), "{n}");
        }
        assert_eq!(v("masa-submatrix").init.components, Some(Components::All));
        for n in ["scratch", "weight-selection", "prune", "naive"] {
            assert_eq!((v(n).init.components, v(n).init.coupled), (None, false), "{n}");
        }
        let e = scaling_variant(&ScalingSpec { components: Some(Components::Energy(0.9)), coupled: false, replica_noise: None });
        assert_eq!((e.name.as_str(), e.group, e.init.components), ("masa-energy0.9", Group::Scaling, Some(Components::Energy(0.9))));
        // Without a count: the default r' (named after it), untouched by the main `[scaling]`.
        let c = scaling_variant(&ScalingSpec { components: None, coupled: true, replica_noise: None }).with_scaling(&ScalingSpec {
            components: Some(Components::Rank(16)),
            coupled: false,
            replica_noise: None,
        });
        assert_eq!((c.name.as_str(), c.init.components, c.init.coupled), ("masa-r64-coupled", Some(crate::init::DEFAULT_COMPONENTS), true));
        let a = scaling_variant(&ScalingSpec { components: Some(Components::All), coupled: true, replica_noise: None });
        assert_eq!((a.name.as_str(), a.init.components), ("masa-rall-coupled", Some(Components::All)));
    }
}
