// Flex Consumption (FC1) plan + Linux function app, Python 3.11, running as the user-assigned
// managed identity. The code package is read from a blob container with that identity; host
// storage and Application Insights use it too. No app setting holds a secret value or a Key Vault
// reference: the app reads its Entra credential (secret or certificate), the token key ring and the
// webhook secret from Key Vault at run time (TTL cache), so a vault problem never stops start-up.

@description('Function app name.')
param name string

@description('Flex Consumption plan name.')
param planName string

@description('Azure region (must offer Flex Consumption).')
param location string

@description('Tags applied to the plan.')
param tags object = {}

@description('Tags applied to the function app (must include azd-service-name).')
param appTags object

@description('Resource id of the user-assigned managed identity.')
param identityId string

@description('Client id of the user-assigned managed identity.')
param identityClientId string

@description('Storage account for host storage and the deployment package.')
param storageAccountName string

@description('Blob container holding the deployment package.')
param deploymentContainerName string

@description('Application Insights component name.')
param applicationInsightsName string

@description('Key Vault URI (https://<name>.vault.azure.net/).')
param keyVaultUri string

// Flex Consumption: "the lowest maximum instance count is 40, the highest 1000"
// (https://learn.microsoft.com/azure/azure-functions/flex-consumption-how-to#set-instance-limits).
@description('Maximum instances Flex Consumption scales out to (40-1000).')
@minValue(40)
@maxValue(1000)
param maximumInstanceCount int = 100

@description('Instance memory size in MB.')
@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048

@description('Zone-redundant plan (only in regions that offer it for Flex Consumption; use ZRS storage with it).')
param zoneRedundant bool = false

@description('Always-ready instances for the HTTP trigger group (0 = none): the OAuth callback and API skip cold starts, at a fixed cost.')
@minValue(0)
@maxValue(1000)
param alwaysReadyHttpInstances int = 0

@description('Settings read by the app (shared/config.py SETTINGS, non-local ones) as {NAME: value}; the settings below are added.')
param appSettings object

@description('Public base URL override (custom domain / front door), without a trailing slash (main.bicep normalises it). Empty: https:// and the app\'s default host name.')
param publicBaseUrl string = ''

// Where the app is reachable; the Entra redirect URI is <baseUrl>/api/connect/microsoft/callback. The host
// name is the one the platform gives the site (defaultHostName), never built from the app name: App Service
// is moving to regional default host names (<name>-<hash>.<region>-01.azurewebsites.net), which a template
// cannot predict. So the app settings are a child resource written after the site exists (below).
var baseUrl = empty(publicBaseUrl) ? 'https://${app.properties.defaultHostName}' : publicBaseUrl

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource applicationInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: applicationInsightsName
}

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    name: 'FC1'
    tier: 'FlexConsumption'
  }
  properties: {
    reserved: true
    zoneRedundant: zoneRedundant
  }
}

resource app 'Microsoft.Web/sites@2024-04-01' = {
  name: name
  location: location
  tags: appTags
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    clientAffinityEnabled: false
    publicNetworkAccess: 'Enabled'
    // Should an operator add a Key Vault reference, it resolves with the user-assigned identity (the
    // template itself uses none); without this the platform would try a system-assigned identity.
    keyVaultReferenceIdentity: identityId
    // No ftpsState: Flex Consumption rejects it in newer regions (error 51021); FTP and SCM basic-auth
    // publishing are off through the basicPublishingCredentialsPolicies below. No cors block: browsers
    // never call the API cross-origin (callers are back ends; the connect flow is a redirect).
    siteConfig: {
      minTlsVersion: '1.2'
      scmMinTlsVersion: '1.2'
      http20Enabled: true
      remoteDebuggingEnabled: false
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storage.properties.primaryEndpoints.blob}${deploymentContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: instanceMemoryMB
        // https://learn.microsoft.com/azure/azure-functions/flex-consumption-plan#always-ready-instances
        alwaysReady: alwaysReadyHttpInstances > 0 ? [
          {
            name: 'http'
            instanceCount: alwaysReadyHttpInstances
          }
        ] : []
      }
      runtime: {
        name: 'python'
        version: '3.11'
      }
    }
  }
}

// Publishing with basic (user name + password) credentials is off: azd and Core Tools deploy with
// an Entra token.
resource ftpPublishing 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: app
  name: 'ftp'
  properties: {
    allow: false
  }
}

resource scmPublishing 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: app
  name: 'scm'
  properties: {
    allow: false
  }
}

// Settings that depend on this template's resources (no secret value).
var derivedSettings = {
  KEY_VAULT_URL: keyVaultUri
  PUBLIC_BASE_URL: baseUrl
}

// Platform settings: identity-based host storage (no connection string, no key), Entra-only
// Application Insights ingestion, and the client id azure-identity (DefaultAzureCredential /
// ManagedIdentityCredential) needs to pick the user-assigned identity.
// PYTHON_ENABLE_OPENTELEMETRY: OpenTelemetry in the Python worker (host.json "telemetryMode": "OpenTelemetry"):
// the host lets the worker export its own telemetry instead of forwarding its logs (no duplicates); the app
// configures the exporters itself (shared/telemetry.py), so PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY, which
// makes the worker call configure_azure_monitor() too, stays unset.
// https://learn.microsoft.com/azure/azure-functions/opentelemetry-howto
// PYTHON_THREADPOOL_THREAD_COUNT: the Python worker runs synchronous functions on min(32, cores + 4) threads by
// default: one or two vCPUs would cap an instance at ~6 concurrent refreshes, each mostly waiting on Entra.
// Match the queue trigger's batchSize + newBatchThreshold (host.json: 16 + 8).
// https://learn.microsoft.com/azure/azure-functions/python-scale-performance-reference#use-multiple-language-worker-processes
var platformSettings = {
  AzureWebJobsStorage__accountName: storage.name
  AzureWebJobsStorage__blobServiceUri: storage.properties.primaryEndpoints.blob
  AzureWebJobsStorage__queueServiceUri: storage.properties.primaryEndpoints.queue
  AzureWebJobsStorage__tableServiceUri: storage.properties.primaryEndpoints.table
  AzureWebJobsStorage__credential: 'managedidentity'
  AzureWebJobsStorage__clientId: identityClientId
  AZURE_CLIENT_ID: identityClientId
  APPLICATIONINSIGHTS_CONNECTION_STRING: applicationInsights.properties.ConnectionString
  APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'Authorization=AAD;ClientId=${identityClientId}'
  PYTHON_ENABLE_OPENTELEMETRY: 'true'
  PYTHON_THREADPOOL_THREAD_COUNT: '24'
}

// Every app setting, written once the site exists (PUBLIC_BASE_URL needs its defaultHostName). This resource
// replaces the whole set: settings added by hand in the portal are removed by the next `azd provision`.
// https://learn.microsoft.com/azure/templates/microsoft.web/sites/config-appsettings
resource settings 'Microsoft.Web/sites/config@2024-04-01' = {
  // checkov:skip=CKV_AZURE_13: a web-config check; this is the appsettings config (infra/README.md)
  // checkov:skip=CKV_AZURE_63: a web-config check; this is the appsettings config (infra/README.md)
  // checkov:skip=CKV_AZURE_65: a web-config check; this is the appsettings config (infra/README.md)
  // checkov:skip=CKV_AZURE_66: a web-config check; this is the appsettings config (infra/README.md)
  // checkov:skip=CKV_AZURE_80: a web-config check; this is the appsettings config (infra/README.md)
  // checkov:skip=CKV_AZURE_88: a web-config check; this is the appsettings config (infra/README.md)
  parent: app
  name: 'appsettings'
  properties: union(appSettings, derivedSettings, platformSettings)
}

output name string = app.name
output id string = app.id
output defaultHostName string = app.properties.defaultHostName
output url string = 'https://${app.properties.defaultHostName}'
output publicBaseUrl string = baseUrl
