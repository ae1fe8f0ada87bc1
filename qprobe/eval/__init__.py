"""Evaluation: metrics, baselines, behavioural probes, the ``qprobe evaluate`` runner and its report.

``config``     ``qprobe evaluate``'s parameters and the names of its methods
``metrics``    SRCC / KRCC / PLCC (raw and after the VQEG logistic mapping), RMSE, bootstrap
               intervals, per-group statistics, box localisation, PSNR / SSIM at native resolution
``baselines``  the scorer interface; the agent (with and without its crop tool) and PIQE (global
               and as a patch-wise probe)
``scoring``    the evaluation sets, and every image through every method into the predictions table
``summary``    each method's metrics on each set, from that table
``probes``     cropping bias, bokeh and repeatability, for any scorer, and which images each gets
``curves``     the training stages' reward curves, read from MLflow
``outputs``    the metrics file, predictions.csv, plot data, traces and probes.json
``figures``    the report's figures (matplotlib), also saved as PNG files
``report``     the self-contained HTML report
``runner``     ``qprobe evaluate``: the steps above in order, and the MLflow run
"""
