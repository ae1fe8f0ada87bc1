"""Evaluation: metrics, baselines, behavioural probes, the ``qprobe evaluate`` runner and its report.

``metrics``    SRCC / KRCC / PLCC (raw and after the VQEG logistic mapping), RMSE, bootstrap
               intervals, per-group statistics, box localisation, PSNR / SSIM at native resolution
``baselines``  the scorer interface; the agent (with and without its crop tool) and PIQE (global
               and as a patch-wise probe)
``probes``     cropping bias, bokeh and repeatability, for any scorer
``runner``     ``qprobe evaluate``: sets, scoring, metrics file, plot data, MLflow
``report``     figures and the self-contained HTML report
"""
